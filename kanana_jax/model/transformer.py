"""The Kanana-2 decoder: embedding, `first_k_dense` dense blocks, MoE blocks (each stack under nn.scan), LM head."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kanana_jax.config import ModelConfig
from kanana_jax.model.attention import GQAttention, MLAttention
from kanana_jax.model.layers import DTYPES, MLP, Embed, RMSNorm, constrain, logits_matmul, param_with_axes
from kanana_jax.model.moe import MoE

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
SCANNED_COLLECTIONS = ("params", "intermediates", "aux_loss", "fp8_meta", "fp8_weights")


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(.)) with ffn = dense MLP or MoE."""
    cfg: ModelConfig
    moe: bool
    fp8: object = None

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
        cfg, pdt = self.cfg, DTYPES[self.cfg.param_dtype]
        attention = MLAttention if cfg.attention_type == "mla" else GQAttention
        normed = RMSNorm(cfg.rms_norm_eps, cfg.norm_param, pdt, "embed", name="attn_norm")(x_BxTxD)
        h_BxTxD = x_BxTxD + attention(cfg, self.fp8, name="attn")(normed, positions_BxT, segment_ids_BxT)
        normed = RMSNorm(cfg.rms_norm_eps, cfg.norm_param, pdt, "embed", name="mlp_norm")(h_BxTxD)
        if self.moe:
            ffn_out = MoE(cfg, self.fp8, name="moe")(normed)
        else:
            ffn_out = MLP(cfg.d_ff, cfg.init_std, DTYPES[cfg.dtype], pdt, self.fp8, name="mlp")(normed)
        out = constrain(h_BxTxD + ffn_out, ("activation_batch", "activation_length", "activation_embed"))
        return out, None


def _block_class(cfg: ModelConfig):
    if cfg.remat_policy == "none":
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)


def layer_stacks(cfg: ModelConfig):
    """(name, is_moe, n_layers) of the dense and MoE stacks, in order; empty stacks are omitted."""
    stacks = [("dense_layers", False, cfg.first_k_dense), ("moe_layers", True, cfg.n_moe_layers)]
    return [s for s in stacks if s[2] > 0]


class Transformer(nn.Module):
    """tokens[B,T] (+ positions, segment ids) -> logits[B,T,V] float32. Apply with mutable=['intermediates',
    'aux_loss'] to read per-layer max attention logits, expert loads and router aux losses.

    `fp8` (kanana_jax.model.fp8.Fp8Recipe, from the config's `precision` section) runs the attention
    projections, dense/shared MLPs, routed experts and (recipe.lm_head) the LM head in fp8; under delayed
    scaling the amax histories are variables of the 'fp8_meta' collection."""
    cfg: ModelConfig
    fp8: object = None

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None, return_hidden=False,
                 input_embeddings_BxTxD=None):
        """`input_embeddings_BxTxD`, when given, replaces the token embeddings (e.g. for projected image features)."""
        cfg = self.cfg
        dt, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        B, T = tokens_BxT.shape
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, dt, pdt, name="embed")
        x_BxTxD = embed(tokens_BxT) if input_embeddings_BxTxD is None else input_embeddings_BxTxD.astype(dt)
        block = _block_class(cfg)
        for name, moe, n in layer_stacks(cfg):
            if cfg.scan_layers:
                scanned = nn.scan(block, variable_axes={c: 0 for c in SCANNED_COLLECTIONS},
                                  split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast), length=n,
                                  metadata_params={nn.PARTITION_NAME: "layers"})
                x_BxTxD, _ = scanned(cfg, moe, self.fp8, name=name)(x_BxTxD, positions_BxT, segment_ids_BxT)
            else:
                for i in range(n):
                    x_BxTxD, _ = block(cfg, moe, self.fp8, name=f"{name}_{i}")(x_BxTxD, positions_BxT,
                                                                              segment_ids_BxT)
        h_BxTxD = RMSNorm(cfg.rms_norm_eps, cfg.norm_param, pdt, "embed", name="final_norm")(x_BxTxD)
        if return_hidden:
            return h_BxTxD
        head_fp8 = self.fp8 if self.fp8 is not None and self.fp8.lm_head else None
        if cfg.tie_embeddings:
            if head_fp8 is not None:
                raise ValueError("precision.fp8_lm_head=True with model.tie_embeddings=True is not supported; "
                                 "set precision.fp8_lm_head=False")
            logits_BxTxV = embed.attend(h_BxTxD)
        else:
            logits_BxTxV = LMHead(cfg.vocab_size, cfg.init_std, pdt, head_fp8, name="lm_head")(h_BxTxD)
        return constrain(logits_BxTxV, ("activation_batch", "activation_length", "activation_vocab"))


class LMHead(nn.Module):
    """Untied output projection kernel [D,V]."""
    vocab_size: int
    init_std: float
    param_dtype: jnp.dtype
    fp8: object = None

    @nn.compact
    def __call__(self, h_BxTxD):
        kernel = param_with_axes(self, "kernel", (h_BxTxD.shape[-1], self.vocab_size), ("embed", "vocab"),
                                 nn.initializers.normal(self.init_std), self.param_dtype)
        if self.fp8 is not None:  # float32 logits; the float32 cotangent is quantized directly
            from kanana_jax.model import fp8
            return fp8.matmul(h_BxTxD, kernel.astype(h_BxTxD.dtype), self.fp8, out_dtype=jnp.float32,
                              history=None if (v := fp8.history_variable(self, "kernel", self.fp8)) is None
                              else v.value, pre=fp8.prequantized(self, "kernel"))
        return logits_matmul(h_BxTxD, kernel)
