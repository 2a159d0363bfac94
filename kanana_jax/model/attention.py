"""Multi-head latent attention (MLA, DeepSeek-V3 / Kanana-2) and grouped-query attention (GQA, for ablations).

Both compute q, k, v, call `attend` (reference or Pallas kernel), and sow the per-head maximum pre-softmax
logit `max_logits[H]` (over batch and positions) into the 'intermediates' collection for MuonClip.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from kanana_jax.config import ModelConfig
from kanana_jax.model import fp8 as fp8_lib
from kanana_jax.model.attention_fn import attend
from kanana_jax.model.layers import DTYPES, RMSNorm, apply_rope, constrain, param_with_axes, rope_frequencies, yarn_mscale

_ACT = ("activation_batch", "activation_length", "activation_heads", "activation_kv")


def _projection(module, spec: str, x, name: str, n_contract: int = 1):
    """The einsum `spec` of x and the weight `name` in the compute dtype, or the fp8 matmul (with that weight's
    amax history under delayed scaling, and its fp8 copies when the step made them ahead) when the module has an
    fp8 recipe."""
    dt, w = DTYPES[module.cfg.dtype], getattr(module, name)
    if module.fp8 is None:
        return jnp.einsum(spec, x, w.astype(dt))
    return fp8_lib.project(x, w, dt, module.fp8, spec, n_contract=n_contract,
                           history_var=module.fp8_histories.get(name), pre=fp8_lib.prequantized(module, name))


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(Dqk), times YaRN's mscale(factor, mscale_all_dim)^2 as in DeepSeek-V3."""
    scale = cfg.qk_head_dim ** -0.5
    if cfg.rope_scaling == "yarn" and cfg.yarn_mscale_all_dim:
        m = yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim)
        scale = scale * m * m
    return scale


class MLAttention(nn.Module):
    """MLA: queries (optionally through a low-rank q_lora), keys/values from a shared latent c_kv[R_kv] plus one
    decoupled RoPE key shared by all heads. Params: wq | (wq_a, q_norm, wq_b); wkv_a; kv_norm; wkv_b; wo.
    `fp8` (an fp8.Fp8Recipe) runs the projections in fp8."""
    cfg: ModelConfig
    fp8: object = None

    def setup(self):
        cfg, pdt = self.cfg, DTYPES[self.cfg.param_dtype]
        D, H, Dq, R, Dr = cfg.d_model, cfg.n_heads, cfg.qk_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        init = nn.initializers.normal(cfg.init_std)
        if cfg.q_lora_rank is None:
            self.wq = param_with_axes(self, "wq", (D, H, Dq), ("embed", "heads", "qk_dim"), init, pdt)
        else:
            self.wq_a = param_with_axes(self, "wq_a", (D, cfg.q_lora_rank), ("embed", "q_lora"), init, pdt)
            self.q_norm = RMSNorm(cfg.rms_norm_eps, cfg.norm_param, pdt, "q_lora")
            self.wq_b = param_with_axes(self, "wq_b", (cfg.q_lora_rank, H, Dq), ("q_lora", "heads", "qk_dim"), init, pdt)
        self.wkv_a = param_with_axes(self, "wkv_a", (D, R + Dr), ("embed", "kv_lora"), init, pdt)
        self.kv_norm = RMSNorm(cfg.rms_norm_eps, cfg.norm_param, pdt, "kv_lora")
        self.wkv_b = param_with_axes(self, "wkv_b", (R, H, cfg.qk_nope_head_dim + cfg.v_head_dim),
                                     ("kv_lora", "heads", "qkv_dim"), init, pdt)
        self.wo = param_with_axes(self, "wo", (H, cfg.v_head_dim, D), ("heads", "v_dim", "embed"), init, pdt)
        self.fp8_histories = _histories(self, ("wq",) if cfg.q_lora_rank is None else ("wq_a", "wq_b"),
                                        "wkv_a", "wkv_b", "wo")

    def project_q(self, x_BxTxD, positions_BxT):
        """Queries [B,T,H,Dnope+Drope] with RoPE applied to the last Drope dims."""
        cfg = self.cfg
        if cfg.q_lora_rank is None:
            q = _projection(self, "btd,dhk->bthk", x_BxTxD, "wq")
        else:
            q_lat = self.q_norm(_projection(self, "btd,dr->btr", x_BxTxD, "wq_a"))
            q = _projection(self, "btr,rhk->bthk", q_lat, "wq_b")
        inv_freq, amplitude = rope_frequencies(cfg, cfg.qk_rope_head_dim)
        Dn = cfg.qk_nope_head_dim
        return jnp.concatenate([q[..., :Dn], apply_rope(q[..., Dn:], positions_BxT, inv_freq, amplitude)], axis=-1)

    def project_kv_latent(self, x_BxTxD, positions_BxT):
        """(normalized latent c_kv[B,T,R_kv], rotated shared rope key [B,T,Drope]): what a decode cache holds."""
        cfg = self.cfg
        kv_a = _projection(self, "btd,dr->btr", x_BxTxD, "wkv_a")
        R = cfg.kv_lora_rank
        inv_freq, amplitude = rope_frequencies(cfg, cfg.qk_rope_head_dim)
        k_rope_BxTxDr = apply_rope(kv_a[:, :, None, R:], positions_BxT, inv_freq, amplitude)[:, :, 0]
        return self.kv_norm(kv_a[..., :R]), k_rope_BxTxDr

    def output(self, out_BxTxHxDv):
        return _projection(self, "bthv,hvd->btd", out_BxTxHxDv, "wo", n_contract=2)

    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
        cfg = self.cfg
        Dn = cfg.qk_nope_head_dim
        q_BxTxHxK = self.project_q(x_BxTxD, positions_BxT)
        c_kv_BxTxR, k_rope_BxTxDr = self.project_kv_latent(x_BxTxD, positions_BxT)
        kv_BxTxHxE = _projection(self, "btr,rhe->bthe", c_kv_BxTxR, "wkv_b")
        k_nope, v_BxTxHxDv = kv_BxTxHxE[..., :Dn], kv_BxTxHxE[..., Dn:]
        k_rope = jnp.broadcast_to(k_rope_BxTxDr[:, :, None, :], k_nope.shape[:3] + (cfg.qk_rope_head_dim,))
        k_BxTxHxK = jnp.concatenate([k_nope, k_rope], axis=-1)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxDv = (constrain(a, _ACT) for a in (q_BxTxHxK, k_BxTxHxK, v_BxTxHxDv))
        out_BxTxHxDv, max_logits_BxHxT = attend(
            q_BxTxHxK, k_BxTxHxK, v_BxTxHxDv, segment_ids_BxT=segment_ids_BxT, causal=True,
            sm_scale=softmax_scale(cfg), logit_soft_cap=cfg.logit_soft_cap, impl=cfg.attention_impl)
        self.sow("intermediates", "max_logits", jnp.max(max_logits_BxHxT, axis=(0, 2)))
        return self.output(out_BxTxHxDv)


class GQAttention(nn.Module):
    """Grouped-query attention with RoPE on the full head dim: wq[D,H,Dh], wk/wv[D,KVH,Dh], wo[H,Dh,D]."""
    cfg: ModelConfig
    fp8: object = None

    def setup(self):
        cfg, pdt = self.cfg, DTYPES[self.cfg.param_dtype]
        D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        init = nn.initializers.normal(cfg.init_std)
        self.wq = param_with_axes(self, "wq", (D, H, Dh), ("embed", "heads", "qk_dim"), init, pdt)
        self.wk = param_with_axes(self, "wk", (D, K, Dh), ("embed", "kv_heads", "qk_dim"), init, pdt)
        self.wv = param_with_axes(self, "wv", (D, K, Dh), ("embed", "kv_heads", "qk_dim"), init, pdt)
        self.wo = param_with_axes(self, "wo", (H, Dh, D), ("heads", "v_dim", "embed"), init, pdt)
        self.fp8_histories = _histories(self, ("wq", "wk", "wv", "wo"))

    def project_qkv(self, x_BxTxD, positions_BxT):
        """(q[B,T,H,Dh], k[B,T,KVH,Dh], v[B,T,KVH,Dh]) with RoPE applied to q and k."""
        cfg = self.cfg
        inv_freq, amplitude = rope_frequencies(cfg, cfg.head_dim)
        q = apply_rope(_projection(self, "btd,dhk->bthk", x_BxTxD, "wq"), positions_BxT, inv_freq, amplitude)
        k = apply_rope(_projection(self, "btd,dhk->bthk", x_BxTxD, "wk"), positions_BxT, inv_freq, amplitude)
        v = _projection(self, "btd,dhk->bthk", x_BxTxD, "wv")
        return q, k, v

    def output(self, out_BxTxHxDh):
        return _projection(self, "bthv,hvd->btd", out_BxTxHxDh, "wo", n_contract=2)

    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
        q, k, v = self.project_qkv(x_BxTxD, positions_BxT)
        out_BxTxHxDh, max_logits_BxHxT = attend(
            q, k, v, segment_ids_BxT=segment_ids_BxT, causal=True, sm_scale=softmax_scale(self.cfg),
            logit_soft_cap=self.cfg.logit_soft_cap, impl=self.cfg.attention_impl)
        self.sow("intermediates", "max_logits", jnp.max(max_logits_BxHxT, axis=(0, 2)))
        return self.output(out_BxTxHxDh)


def _histories(module, *names) -> dict:
    """{weight name: amax-history variable} of the projection sites under delayed fp8 scaling, else {}."""
    if module.fp8 is None or not module.fp8.delayed:
        return {}
    flat = [n for group in names for n in (group if isinstance(group, tuple) else (group,))]
    return {name: fp8_lib.history_variable(module, name, module.fp8) for name in flat}
