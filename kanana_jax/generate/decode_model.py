"""Prefill and one-token decode of `Transformer` with a KV cache, as pure functions of its parameter tree.

Prefill runs the model itself (same modules, same attention implementation) over the left-padded prompts, with
padding isolated by segment ids, and captures each layer's cache entries from the attention projections.
Decode reuses the model's submodules (RMSNorm, MLAttention/GQAttention projections, MLP/MoE, embedding and
head) token by token; attention runs against the cache. `DecodeOptions` picks the MoE path (`decode_moe`) and the
dtype of the MLA matmuls over the cache. For MLA the up-projections are absorbed as in
DeepSeek-V3 inference: scores are q_nope W_UK . c_kv + q_rope . k_rope (never expanding keys), values are
(probs . c_kv) W_UV, then wo. Softmax scale, YaRN and the logit soft-cap are the model's.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
from jax import lax

from kanana_jax.config import ModelConfig
from kanana_jax.generate import decode_moe, expert_kernel, kv_cache, sampling
from kanana_jax.model.attention import GQAttention, MLAttention, softmax_scale
from kanana_jax.model.layers import DTYPES, MLP, Embed, RMSNorm
from kanana_jax.model.moe import MoE
from kanana_jax.model.transformer import LMHead, Transformer, layer_stacks
from kanana_jax.parallel import expert as expert_parallel

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How a decode step computes (the same function either way).

    moe: the routed-expert path (`decode_moe.MOE_PATHS`; 'model' = the model's MoE module, the first version).
    mla_matmul: 'cache' = MLA scores/values as matmuls on the cache's dtype with float32 accumulation;
      'float32' = the cache cast to float32 first (the first version; reads and writes an f32 copy per layer).
    expert_blocks: the 'kernel' path's block sizes.
    layer_unroll: layers per iteration of the layer scan (lax.scan's unroll; >= the layer count: straight code).
    sampling_filter: how top-k / top-p masks are computed (`sampling.METHODS`: 'search' = threshold searches
      without a sort, the default; 'sort' = a full sort of the vocabulary, the first version).
    """
    moe: str = "auto"
    mla_matmul: str = "cache"
    expert_blocks: expert_kernel.BlockSizes = expert_kernel.BlockSizes()
    layer_unroll: int = 1
    sampling_filter: str = "search"

    def __post_init__(self):
        if self.moe not in decode_moe.MOE_PATHS:
            raise ValueError(f"DecodeOptions.moe={self.moe!r}; allowed values: {', '.join(decode_moe.MOE_PATHS)}")
        if self.mla_matmul not in ("cache", "float32"):
            raise ValueError(f"DecodeOptions.mla_matmul={self.mla_matmul!r}; allowed values: 'cache', 'float32'")
        if self.sampling_filter not in sampling.METHODS:
            raise ValueError(f"DecodeOptions.sampling_filter={self.sampling_filter!r}; allowed values: "
                             f"{', '.join(sampling.METHODS)}")


def inference_config(cfg: ModelConfig) -> ModelConfig:
    """The model config without rematerialization (same parameter tree, nothing to differentiate)."""
    return dataclasses.replace(cfg, remat_policy="none")


def _norm(cfg: ModelConfig, params, x):
    return RMSNorm(cfg.rms_norm_eps, cfg.norm_param, DTYPES[cfg.param_dtype], "embed").apply({"params": params}, x)


def _embed_module(cfg: ModelConfig) -> Embed:
    return Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype])


def lm_logits(params, cfg: ModelConfig, h_BxTxD):
    """Final-normed hidden states [B,T,D] -> float32 logits [B,T,V] through the tied embedding or the LM head."""
    if cfg.tie_embeddings:
        return _embed_module(cfg).apply({"params": params["embed"]}, h_BxTxD, method=Embed.attend)
    head = LMHead(cfg.vocab_size, cfg.init_std, DTYPES[cfg.param_dtype])
    return head.apply({"params": params["lm_head"]}, h_BxTxD)


def prompt_layout(P: int, lengths_B):
    """(start slot[B] = P - length, positions[B,P], segment ids[B,P]: 1 on prompt tokens, 0 on left padding)."""
    start_B = P - lengths_B.astype(jnp.int32)
    slots_P = jnp.arange(P, dtype=jnp.int32)
    positions_BxP = jnp.maximum(slots_P[None, :] - start_B[:, None], 0)
    segment_ids_BxP = (slots_P[None, :] >= start_B[:, None]).astype(jnp.int32)
    return start_B, positions_BxP, segment_ids_BxP


def prefill(params, tokens_BxP, lengths_B, *, cfg: ModelConfig, cache_len: int):
    """Left-padded prompts [B,P] (row b's prompt in its last lengths[b] slots) -> (cache with S=cache_len slots,
    float32 logits [B,V] of the token after each prompt)."""
    cfg = inference_config(cfg)
    _, positions_BxP, segment_ids_BxP = prompt_layout(tokens_BxP.shape[1], lengths_B)
    method = kv_cache.CAPTURED_METHOD[cfg.attention_type]
    h_BxPxD, state = Transformer(cfg).apply(
        {"params": params}, tokens_BxP, positions_BxP, segment_ids_BxP, return_hidden=True,
        capture_intermediates=lambda module, name: name == method, mutable=["intermediates"])
    logits_BxV = lm_logits(params, cfg, h_BxPxD[:, -1:])[:, 0]
    return kv_cache.from_captured(cfg, state["intermediates"], cache_len), logits_BxV


def _masked_softmax(scores, visible, cfg: ModelConfig):
    """Scaled, soft-capped, masked softmax in float32 over the last (slot) axis, as the reference attention."""
    scores = scores * softmax_scale(cfg)
    if cfg.logit_soft_cap is not None:
        scores = cfg.logit_soft_cap * jnp.tanh(scores / cfg.logit_soft_cap)
    return jax.nn.softmax(jnp.where(visible, scores, -1e30), axis=-1)


def _write(cache_field, new_Bx1x, layer, slot):
    """Writes one slot of one layer: cache[layer, :, slot] = new; returns (updated cache, that layer [B,S,...])."""
    start = (layer, 0, slot) + (0,) * (cache_field.ndim - 3)
    cache_field = lax.dynamic_update_slice(cache_field, new_Bx1x[None].astype(cache_field.dtype), start)
    return cache_field, lax.dynamic_index_in_dim(cache_field, layer, 0, keepdims=False)


def mla_decode_attention(cfg: ModelConfig, params, x_Bx1xD, positions_B, cache: dict, layer, slot, visible_BxS,
                         matmul: str = "cache"):
    """One token of MLA against the latent cache with absorbed up-projections -> (out [B,1,D], cache).
    `matmul` ('cache' or 'float32'): see DecodeOptions.mla_matmul."""
    attn, dt, Dn = MLAttention(cfg), DTYPES[cfg.dtype], cfg.qk_nope_head_dim
    variables, pos_Bx1 = {"params": params}, positions_B[:, None]
    q_BxHxK = attn.apply(variables, x_Bx1xD, pos_Bx1, method=MLAttention.project_q)[:, 0]
    c_kv_new, k_rope_new = attn.apply(variables, x_Bx1xD, pos_Bx1, method=MLAttention.project_kv_latent)
    c_field, c_kv_BxSxR = _write(cache["c_kv"], c_kv_new, layer, slot)
    r_field, k_rope_BxSxDr = _write(cache["k_rope"], k_rope_new, layer, slot)
    wkv_b = params["wkv_b"].astype(dt)
    w_uk_RxHxDn, w_uv_RxHxDv = wkv_b[..., :Dn], wkv_b[..., Dn:]
    f32 = jnp.float32
    mm = c_kv_BxSxR.dtype if matmul == "cache" else f32   # operand dtype of the matmuls over the cache
    c_kv, k_rope = c_kv_BxSxR.astype(mm), k_rope_BxSxDr.astype(mm)
    q_lat_BxHxR = jnp.einsum("bhn,rhn->bhr", q_BxHxK[..., :Dn], w_uk_RxHxDn, preferred_element_type=f32)
    scores_BxHxS = (jnp.einsum("bhr,bsr->bhs", q_lat_BxHxR.astype(mm), c_kv, preferred_element_type=f32)
                    + jnp.einsum("bhd,bsd->bhs", q_BxHxK[..., Dn:].astype(mm), k_rope, preferred_element_type=f32))
    probs_BxHxS = _masked_softmax(scores_BxHxS, visible_BxS[:, None, :], cfg)
    out_lat_BxHxR = jnp.einsum("bhs,bsr->bhr", probs_BxHxS.astype(mm), c_kv, preferred_element_type=f32)
    out_BxHxDv = jnp.einsum("bhr,rhv->bhv", out_lat_BxHxR, w_uv_RxHxDv.astype(f32)).astype(dt)
    out_Bx1xD = attn.apply(variables, out_BxHxDv[:, None], method=MLAttention.output)
    return out_Bx1xD, {"c_kv": c_field, "k_rope": r_field}


def gqa_decode_attention(cfg: ModelConfig, params, x_Bx1xD, positions_B, cache: dict, layer, slot, visible_BxS,
                         matmul: str = "cache"):
    """One token of grouped-query attention against the k/v cache -> (out [B,1,D], cache). (`matmul` is
    accepted for a uniform signature: these matmuls always run on the cache's dtype.)"""
    attn, dt = GQAttention(cfg), DTYPES[cfg.dtype]
    variables = {"params": params}
    q, k_new, v_new = attn.apply(variables, x_Bx1xD, positions_B[:, None], method=GQAttention.project_qkv)
    k_field, k_BxSxKxD = _write(cache["k"], k_new, layer, slot)
    v_field, v_BxSxKxD = _write(cache["v"], v_new, layer, slot)
    B, _, H, Dh = q.shape
    K = cfg.n_kv_heads
    q_BxKxGxD = q[:, 0].reshape(B, K, H // K, Dh)
    scores = jnp.einsum("bkgd,bskd->bkgs", q_BxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32)
    probs = _masked_softmax(scores, visible_BxS[:, None, None, :], cfg)
    out = jnp.einsum("bkgs,bskd->bkgd", probs.astype(v_BxSxKxD.dtype), v_BxSxKxD,
                     preferred_element_type=jnp.float32)
    out_Bx1xHxD = out.reshape(B, 1, H, Dh).astype(dt)
    return attn.apply(variables, out_Bx1xHxD, method=GQAttention.output), {"k": k_field, "v": v_field}


def _decode_block(cfg: ModelConfig, moe: bool, params, x_Bx1xD, positions_B, cache, layer, slot, visible_BxS,
                  options: DecodeOptions, expert_stacks=None):
    """The model's Block for one token: x + attn(norm(x)), then + ffn(norm(.)). With `expert_stacks` (the routed
    expert weights of the whole stack) the MoE runs `decode_moe`; without, the model's MoE module."""
    attend = mla_decode_attention if cfg.attention_type == "mla" else gqa_decode_attention
    attn_out, cache = attend(cfg, params["attn"], _norm(cfg, params["attn_norm"], x_Bx1xD), positions_B, cache,
                             layer, slot, visible_BxS, options.mla_matmul)
    h_Bx1xD = x_Bx1xD + attn_out
    normed = _norm(cfg, params["mlp_norm"], h_Bx1xD)
    if moe and expert_stacks is not None:
        ffn = decode_moe.decode_moe(cfg, params["moe"], normed, layer, expert_stacks, path=options.moe,
                                    blocks=options.expert_blocks)
    elif moe:
        ffn = MoE(cfg).apply({"params": params["moe"]}, normed)
    else:
        ffn = MLP(cfg.d_ff, cfg.init_std, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]).apply(
            {"params": params["mlp"]}, normed)
    return h_Bx1xD + ffn, cache


_LOGGED = set()


def _moe_path(cfg: ModelConfig, options: DecodeOptions) -> str:
    """options.moe, or 'model' when the experts are split over a mesh axis (the model's all-to-all dispatch)."""
    if options.moe != "model" and expert_parallel.current_plan(cfg) is not None:
        if "ep" not in _LOGGED:
            _LOGGED.add("ep")
            _log.info("decode: experts are split over the mesh; the MoE runs the model's expert-parallel dispatch "
                      "instead of DecodeOptions.moe=%r", options.moe)
        return "model"
    return options.moe


def decode_step(params, cache: dict, tokens_B, slot, start_B, *, cfg: ModelConfig, stacked_layers=None,
                options: DecodeOptions = DecodeOptions()):
    """Feeds tokens[B] at cache slot `slot` (position slot - start[b]) -> (float32 logits [B,V], updated cache).

    Slots before start[b] (left padding) and after `slot` are invisible. `stacked_layers`, when given, is
    `kv_cache.stacked_layer_params(cfg, params)` computed once outside a decode loop (unscanned models).
    Unless the MoE path is 'model', the routed expert weights stay out of the layer scan's sliced inputs and the
    decode MoE indexes the whole stack (the gather path then reads only the B*k expert matrices it needs).
    """
    cfg = inference_config(cfg)
    S = next(iter(next(iter(cache.values())).values())).shape[2]
    positions_B = slot - start_B
    slots_S = jnp.arange(S, dtype=jnp.int32)
    visible_BxS = (slots_S[None, :] >= start_B[:, None]) & (slots_S[None, :] <= slot)
    x_Bx1xD = _embed_module(cfg).apply({"params": params["embed"]}, tokens_B[:, None])
    stacked = kv_cache.stacked_layer_params(cfg, params) if stacked_layers is None else stacked_layers
    moe_path = decode_moe.resolve_path(_moe_path(cfg, options), tokens_B.shape[0] * cfg.top_k, cfg.n_routed_experts)
    new_cache = {}
    for name, moe, n in layer_stacks(cfg):
        xs, expert_stacks = stacked[name], None
        if moe and moe_path != "model":
            experts = xs["moe"]["experts"]
            expert_stacks = {w: experts[w] for w in decode_moe.EXPERT_WEIGHTS}
            xs = {**xs, "moe": {k: v for k, v in xs["moe"].items() if k != "experts"}}
        layer_options = dataclasses.replace(options, moe=moe_path)

        def body(carry, layer_params_and_index, moe=moe, expert_stacks=expert_stacks, layer_options=layer_options):
            x, c = carry
            layer_params, layer = layer_params_and_index
            return _decode_block(cfg, moe, layer_params, x, positions_B, c, layer, slot, visible_BxS, layer_options,
                                 expert_stacks), None

        (x_Bx1xD, new_cache[name]), _ = lax.scan(body, (x_Bx1xD, cache[name]), (xs, jnp.arange(n, dtype=jnp.int32)),
                                                 unroll=max(1, min(n, options.layer_unroll)))
    h_Bx1xD = _norm(cfg, params["final_norm"], x_Bx1xD)
    return lm_logits(params, cfg, h_Bx1xD)[:, 0], new_cache
