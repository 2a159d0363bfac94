"""Building blocks: RMSNorm, embedding, RoPE with YaRN, SwiGLU MLP, and parameter helpers with logical axes."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from kanana_jax.config import ModelConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(cfg: ModelConfig):
    return DTYPES[cfg.dtype]


def param_with_axes(module: nn.Module, name: str, shape: tuple, axes: tuple, init, dtype):
    """Declares a parameter whose sharding is given by logical axis names (one per dimension)."""
    assert len(shape) == len(axes), (name, shape, axes)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def constrain(x, axes: tuple):
    """Annotates an activation with logical axis names (a no-op outside a mesh with rules)."""
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis; `param` 'scale' multiplies by w (init 1), 'one_plus' by (1+w) (init 0)."""
    eps: float
    parameterization: str = "scale"
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.ones if self.parameterization == "scale" else nn.initializers.zeros
        w = param_with_axes(self, "scale", (x.shape[-1],), (self.axis_name,), init, self.param_dtype)
        x32 = x.astype(jnp.float32)
        x_hat = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w32 = w.astype(jnp.float32)
        y = x_hat * (w32 if self.parameterization == "scale" else 1.0 + w32)
        return y.astype(x.dtype)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention-temperature factor 0.1*m*ln(s)+1 (1 when s <= 1)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(cfg: ModelConfig, dim: int):
    """(inv_freq[dim/2], cos/sin amplitude) for RoPE, with YaRN's ramp between interpolation and extrapolation."""
    base = cfg.rope_theta
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    inv_freq = 1.0 / (base ** exponents)
    if cfg.rope_scaling != "yarn" or cfg.yarn_factor <= 1.0:
        return inv_freq, 1.0
    factor = cfg.yarn_factor

    def correction_dim(n_rotations):
        return dim * math.log(cfg.yarn_original_max_position / (n_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    extrapolation_weight = 1.0 - ramp
    inv_freq = (inv_freq / factor) * (1.0 - extrapolation_weight) + inv_freq * extrapolation_weight
    amplitude = yarn_mscale(factor, cfg.yarn_mscale) / yarn_mscale(factor, cfg.yarn_mscale_all_dim)
    return inv_freq, amplitude


def apply_rope(x_BxTxNxR, positions_BxT, inv_freq_R2, amplitude=1.0):
    """Rotates the last axis of x (split into halves, 'rotate_half' convention) by position * inv_freq."""
    angles_BxTxR2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq_R2
    cos = (jnp.cos(angles_BxTxR2) * amplitude)[:, :, None, :]
    sin = (jnp.sin(angles_BxTxR2) * amplitude)[:, :, None, :]
    x32 = x_BxTxNxR.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxTxNxR.dtype)


@jax.custom_vjp
def logits_matmul(h_BxTxD, w_DxV):
    """h @ w with float32 output; the backward casts the float32 cotangent to h's dtype first, so the two big
    gradient GEMMs of the LM head run on bf16 tensor cores instead of in fp32/TF32."""
    return jnp.einsum("btd,dv->btv", h_BxTxD, w_DxV.astype(h_BxTxD.dtype), preferred_element_type=jnp.float32)


def _logits_matmul_fwd(h_BxTxD, w_DxV):
    return logits_matmul(h_BxTxD, w_DxV), (h_BxTxD, w_DxV)


def _logits_matmul_bwd(res, g_BxTxV):
    h_BxTxD, w_DxV = res
    g = g_BxTxV.astype(h_BxTxD.dtype)
    dh = jnp.einsum("btv,dv->btd", g, w_DxV.astype(h_BxTxD.dtype), preferred_element_type=jnp.float32)
    dw = jnp.einsum("btd,btv->dv", h_BxTxD, g, preferred_element_type=jnp.float32)
    return dh.astype(h_BxTxD.dtype), dw.astype(w_DxV.dtype)


logits_matmul.defvjp(_logits_matmul_fwd, _logits_matmul_bwd)


class Embed(nn.Module):
    """Token embedding table [V, D]; `attend` gives tied logits."""
    vocab_size: int
    d_model: int
    init_std: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    def setup(self):
        self.embedding = param_with_axes(self, "embedding", (self.vocab_size, self.d_model), ("vocab", "embed"),
                                         nn.initializers.normal(self.init_std), self.param_dtype)

    def __call__(self, tokens_BxT):
        x_BxTxD = jnp.take(self.embedding, tokens_BxT, axis=0).astype(self.dtype)
        return constrain(x_BxTxD, ("activation_batch", "activation_length", "activation_embed"))

    def attend(self, x_BxTxD):
        """Tied logits [B,T,V] float32."""
        return logits_matmul(x_BxTxD.astype(self.dtype), self.embedding.T)


class MLP(nn.Module):
    """SwiGLU feed-forward: w_down(silu(x w_gate) * (x w_up)); weights [D,F], [D,F], [F,D]. `fp8` (an
    fp8.Fp8Recipe) runs the three matmuls in fp8."""
    d_ff: int
    init_std: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    fp8: object = None

    @nn.compact
    def __call__(self, x_BxTxD):
        d = x_BxTxD.shape[-1]
        init = nn.initializers.normal(self.init_std)
        w_gate = param_with_axes(self, "w_gate", (d, self.d_ff), ("embed", "mlp"), init, self.param_dtype)
        w_up = param_with_axes(self, "w_up", (d, self.d_ff), ("embed", "mlp"), init, self.param_dtype)
        w_down = param_with_axes(self, "w_down", (self.d_ff, d), ("mlp", "embed"), init, self.param_dtype)
        x = x_BxTxD.astype(self.dtype)
        if self.fp8 is not None:
            from kanana_jax.model import fp8
            mm = lambda a, w, name: fp8.project(a, w, self.dtype, self.fp8, "", history_var=fp8.history_variable(
                self, name, self.fp8), pre=fp8.prequantized(self, name))
            gate_BxTxF, up_BxTxF = mm(x, w_gate, "w_gate"), mm(x, w_up, "w_up")
            h_BxTxF = constrain(jax.nn.silu(gate_BxTxF) * up_BxTxF,
                                ("activation_batch", "activation_length", "activation_mlp"))
            return mm(h_BxTxF, w_down, "w_down")
        gate_BxTxF = jnp.einsum("btd,df->btf", x, w_gate.astype(self.dtype))
        up_BxTxF = jnp.einsum("btd,df->btf", x, w_up.astype(self.dtype))
        h_BxTxF = constrain(jax.nn.silu(gate_BxTxF) * up_BxTxF, ("activation_batch", "activation_length", "activation_mlp"))
        return jnp.einsum("btf,fd->btd", h_BxTxF, w_down.astype(self.dtype))
