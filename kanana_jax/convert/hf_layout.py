"""Where each of our parameters lives in a HuggingFace DeepSeek-V3 checkpoint, and how it is laid out there.

HF `nn.Linear` weights are [out, in]; ours are [in, ...out] with explicit head axes. DeepSeek stores the RoPE
columns of q_proj / q_b_proj and the RoPE rows of kv_a_proj_with_mqa in interleaved pairs (x0,x1),(x2,x3),...
(`rope_interleave`, transformers' default), while our RoPE rotates halves; permuting those columns
(evens first, then odds) makes the two exactly equal. Per-layer tensors are stacked on a leading layer axis
(scanned stacks) and routed experts on an expert axis.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from kanana_jax.config import ModelConfig
from kanana_jax.model.transformer import layer_stacks


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One of our parameter leaves, stacked over `outer` (layers, experts) from HF tensors of shape `hf_shape`."""
    path: tuple                       # our param path, e.g. ('moe_layers', 'moe', 'experts', 'w_gate')
    outer: tuple                      # sizes of the stacked leading axes: () | (L,) | (L, E)
    inner: tuple                      # our shape of one HF tensor
    hf_shape: tuple
    hf_name: Callable[[tuple], str]   # outer index -> HF tensor name
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    float32: bool = False             # kept in float32 whatever the chosen dtype (router kernel and bias)

    @property
    def shape(self) -> tuple:
        return self.outer + self.inner

    def names(self):
        """(outer index, HF name) for every HF tensor of this leaf, in order."""
        for idx in np.ndindex(*self.outer) if self.outer else [()]:
            yield tuple(int(i) for i in idx), self.hf_name(tuple(int(i) for i in idx))


def rope_permutation(dim: int, interleaved: bool) -> np.ndarray:
    """perm with ours[j] = hf[perm[j]]: interleaved pairs -> halves (evens then odds); identity otherwise."""
    if not interleaved:
        return np.arange(dim)
    return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])


def _transpose():
    return (lambda a: np.asarray(a).T), (lambda b: np.asarray(b).T)


def _heads_out(H: int, K: int, perm: np.ndarray):
    """HF [H*K, I] <-> ours [I, H, K], permuting each head's K columns by `perm`."""
    inv = np.argsort(perm)

    def to_ours(a):
        a = np.asarray(a)
        return a.reshape(H, K, a.shape[-1])[:, perm, :].transpose(2, 0, 1)

    def to_hf(b):
        b = np.asarray(b)
        return b.transpose(1, 2, 0)[:, inv, :].reshape(H * K, b.shape[0])
    return to_ours, to_hf


def _heads_in(H: int, K: int):
    """HF [D, H*K] <-> ours [H, K, D] (the output projection)."""
    def to_ours(a):
        a = np.asarray(a)
        return a.reshape(a.shape[0], H, K).transpose(1, 2, 0)

    def to_hf(b):
        b = np.asarray(b)
        return b.transpose(2, 0, 1).reshape(b.shape[2], H * K)
    return to_ours, to_hf


def _rows_permuted_transpose(perm: np.ndarray):
    """HF [O, I] <-> ours [I, O] with ours[:, j] = hf[perm[j], :]."""
    inv = np.argsort(perm)
    return (lambda a: np.asarray(a)[perm].T), (lambda b: np.asarray(b).T[inv])


def _norm(one_plus: bool):
    """HF weight w <-> our scale: w itself ('scale') or w - 1 ('one_plus')."""
    if not one_plus:
        return (lambda a: np.asarray(a)), (lambda b: np.asarray(b))
    return (lambda a: np.asarray(a, np.float32) - 1.0), (lambda b: np.asarray(b, np.float32) + 1.0)


def _layer_entries(cfg: ModelConfig, moe: bool, interleaved: bool):
    """(our sub-path, HF suffix, our inner shape, HF shape, to_ours, to_hf, float32, per_expert) of one block."""
    D, H, R, Dr = cfg.d_model, cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    Dn, Dv, Dq = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.qk_head_dim
    q_perm = np.concatenate([np.arange(Dn), Dn + rope_permutation(Dr, interleaved)])
    kv_perm = np.concatenate([np.arange(R), R + rope_permutation(Dr, interleaved)])
    norm = _norm(cfg.norm_param == "one_plus")
    e = [(("attn_norm", "scale"), "input_layernorm.weight", (D,), (D,), *norm, False, False),
         (("mlp_norm", "scale"), "post_attention_layernorm.weight", (D,), (D,), *norm, False, False)]
    if cfg.q_lora_rank is None:
        e.append((("attn", "wq"), "self_attn.q_proj.weight", (D, H, Dq), (H * Dq, D), *_heads_out(H, Dq, q_perm),
                  False, False))
    else:
        Rq = cfg.q_lora_rank
        e += [(("attn", "wq_a"), "self_attn.q_a_proj.weight", (D, Rq), (Rq, D), *_transpose(), False, False),
              (("attn", "q_norm", "scale"), "self_attn.q_a_layernorm.weight", (Rq,), (Rq,), *norm, False, False),
              (("attn", "wq_b"), "self_attn.q_b_proj.weight", (Rq, H, Dq), (H * Dq, Rq),
               *_heads_out(H, Dq, q_perm), False, False)]
    e += [(("attn", "wkv_a"), "self_attn.kv_a_proj_with_mqa.weight", (D, R + Dr), (R + Dr, D),
           *_rows_permuted_transpose(kv_perm), False, False),
          (("attn", "kv_norm", "scale"), "self_attn.kv_a_layernorm.weight", (R,), (R,), *norm, False, False),
          (("attn", "wkv_b"), "self_attn.kv_b_proj.weight", (R, H, Dn + Dv), (H * (Dn + Dv), R),
           *_heads_out(H, Dn + Dv, np.arange(Dn + Dv)), False, False),
          (("attn", "wo"), "self_attn.o_proj.weight", (H, Dv, D), (D, H * Dv), *_heads_in(H, Dv), False, False)]
    if not moe:
        F = cfg.d_ff
        return e + [(("mlp", "w_gate"), "mlp.gate_proj.weight", (D, F), (F, D), *_transpose(), False, False),
                    (("mlp", "w_up"), "mlp.up_proj.weight", (D, F), (F, D), *_transpose(), False, False),
                    (("mlp", "w_down"), "mlp.down_proj.weight", (F, D), (D, F), *_transpose(), False, False)]
    E, F = cfg.n_routed_experts, cfg.moe_d_ff
    ident = (lambda a: np.asarray(a)), (lambda b: np.asarray(b))
    e += [(("moe", "router", "kernel"), "mlp.gate.weight", (D, E), (E, D), *_transpose(), True, False),
          (("moe", "router", "bias"), "mlp.gate.e_score_correction_bias", (E,), (E,), *ident, True, False),
          (("moe", "experts", "w_gate"), "gate_proj.weight", (D, F), (F, D), *_transpose(), False, True),
          (("moe", "experts", "w_up"), "up_proj.weight", (D, F), (F, D), *_transpose(), False, True),
          (("moe", "experts", "w_down"), "down_proj.weight", (F, D), (D, F), *_transpose(), False, True)]
    if cfg.n_shared_experts:
        Fs = cfg.n_shared_experts * F
        e += [(("moe", "shared", "w_gate"), "mlp.shared_experts.gate_proj.weight", (D, Fs), (Fs, D), *_transpose(),
               False, False),
              (("moe", "shared", "w_up"), "mlp.shared_experts.up_proj.weight", (D, Fs), (Fs, D), *_transpose(),
               False, False),
              (("moe", "shared", "w_down"), "mlp.shared_experts.down_proj.weight", (Fs, D), (D, Fs),
               *_transpose(), False, False)]
    return e


def _layer_name(first: int, suffix: str, per_expert: bool, scanned: bool):
    if per_expert:
        if scanned:
            return lambda idx: f"model.layers.{first + idx[0]}.mlp.experts.{idx[1]}.{suffix}"
        return lambda idx: f"model.layers.{first}.mlp.experts.{idx[0]}.{suffix}"
    if scanned:
        return lambda idx: f"model.layers.{first + idx[0]}.{suffix}"
    return lambda idx: f"model.layers.{first}.{suffix}"


def tensor_maps(cfg: ModelConfig, *, interleaved: bool = True) -> list[TensorMap]:
    """Every parameter leaf of `Transformer(cfg)` with its HF source tensors (scanned or per-layer stacks)."""
    D, V = cfg.d_model, cfg.vocab_size
    ident = (lambda a: np.asarray(a)), (lambda b: np.asarray(b))
    maps = [TensorMap(("embed", "embedding"), (), (V, D), (V, D), lambda idx: "model.embed_tokens.weight", *ident),
            TensorMap(("final_norm", "scale"), (), (D,), (D,), lambda idx: "model.norm.weight",
                      *_norm(cfg.norm_param == "one_plus"))]
    if not cfg.tie_embeddings:
        maps.append(TensorMap(("lm_head", "kernel"), (), (D, V), (V, D), lambda idx: "lm_head.weight", *_transpose()))
    first = 0
    for stack, moe, n in layer_stacks(cfg):
        entries = _layer_entries(cfg, moe, interleaved)
        for sub, suffix, inner, hf_shape, to_ours, to_hf, f32, per_expert in entries:
            experts = (cfg.n_routed_experts,) if per_expert else ()
            if cfg.scan_layers:
                maps.append(TensorMap((stack,) + sub, (n,) + experts, inner, hf_shape,
                                      _layer_name(first, suffix, per_expert, True), to_ours, to_hf, f32))
            else:
                for i in range(n):
                    maps.append(TensorMap((f"{stack}_{i}",) + sub, experts, inner, hf_shape,
                                          _layer_name(first + i, suffix, per_expert, False), to_ours, to_hf, f32))
        first += n
    return maps
