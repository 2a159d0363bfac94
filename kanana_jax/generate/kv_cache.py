"""Decode caches: one dict of arrays [L, B, S, ...] per layer stack ('dense_layers', 'moe_layers').

MLA caches what DeepSeek-V3 inference caches: the normalized latent `c_kv` [L,B,S,R_kv] and the rotated shared
RoPE key `k_rope` [L,B,S,Drope] (R_kv + Drope numbers per token per layer instead of H*(Dqk+Dv)).
GQA caches rotated keys `k` and values `v` [L,B,S,KVH,Dh]. Entries are in the model's activation dtype.
Slots are left-padded: a row with prompt length n of a P-slot prompt buffer holds its prompt in slots P-n..P-1.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from kanana_jax.config import ModelConfig
from kanana_jax.model.layers import DTYPES
from kanana_jax.model.transformer import layer_stacks

# the attention method whose outputs a prefill captures, and which of its outputs the cache keeps
CAPTURED_METHOD = {"mla": "project_kv_latent", "gqa": "project_qkv"}
_KEPT = {"mla": (("c_kv", 0), ("k_rope", 1)), "gqa": (("k", 1), ("v", 2))}


def entry_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-token, per-layer trailing shape of each cache field."""
    if cfg.attention_type == "mla":
        return {"c_kv": (cfg.kv_lora_rank,), "k_rope": (cfg.qk_rope_head_dim,)}
    return {"k": (cfg.n_kv_heads, cfg.head_dim), "v": (cfg.n_kv_heads, cfg.head_dim)}


def cache_bytes(cfg: ModelConfig, batch: int, cache_len: int) -> int:
    """Bytes of a cache for `batch` rows of `cache_len` slots over all layers."""
    per_token = sum(math.prod(s) for s in entry_shapes(cfg).values())
    return cfg.n_layers * batch * cache_len * per_token * jnp.dtype(DTYPES[cfg.dtype]).itemsize


def from_captured(cfg: ModelConfig, intermediates: dict, cache_len: int) -> dict:
    """Cache from a prefill's captured attention projections, zero-padded from P to `cache_len` slots."""
    method, kept = CAPTURED_METHOD[cfg.attention_type], _KEPT[cfg.attention_type]
    cache = {}
    for name, _, n in layer_stacks(cfg):
        if cfg.scan_layers:
            outs = intermediates[name]["attn"][method][0]
        else:
            per_layer = [intermediates[f"{name}_{i}"]["attn"][method][0] for i in range(n)]
            outs = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
        fields = {}
        for field, index in kept:
            x = outs[index]  # [L, B, P, ...]
            if x.shape[2] > cache_len:
                raise ValueError(f"cache_len={cache_len} is shorter than the prompt buffer ({x.shape[2]} slots)")
            pad = [(0, 0)] * x.ndim
            pad[2] = (0, cache_len - x.shape[2])
            fields[field] = jnp.pad(x, pad)
        cache[name] = fields
    return cache


def stacked_layer_params(cfg: ModelConfig, params: dict) -> dict:
    """{stack: params with a leading layer axis}, stacking per-layer trees when the model was not scanned."""
    out = {}
    for name, _, n in layer_stacks(cfg):
        if cfg.scan_layers:
            out[name] = params[name]
        else:
            out[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"{name}_{i}"] for i in range(n)])
    return out


def cache_shardings(cfg: ModelConfig, mesh, batch_axes) -> dict:
    """NamedShardings of a cache: rows split over `batch_axes` (the data-parallel mesh axes), rest replicated."""
    return {name: {f: NamedSharding(mesh, P(None, batch_axes, *([None] * (1 + len(shape)))))
                   for f, shape in entry_shapes(cfg).items()}
            for name, _, _ in layer_stacks(cfg)}
