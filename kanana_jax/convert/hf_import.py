"""HuggingFace DeepSeek-V3 checkpoint (config.json + safetensors shards) -> our ModelConfig and param tree.

Tensors are read one at a time from memory-mapped shards and written into each leaf's blocks; with
`shardings`, every device's block is assembled from just the HF tensors (and slices) it needs
(`jax.make_array_from_callback`), so a large checkpoint is never whole in host memory.

    cfg, params, hf = load_hf_checkpoint("/ckpt/kanana-2-30b-a3b-base", param_dtype="bfloat16")
    logits = Transformer(cfg).apply({"params": params}, tokens)
"""
from __future__ import annotations

import functools
import logging
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np

from kanana_jax.config import ModelConfig
from kanana_jax.convert import hf_config
from kanana_jax.convert.hf_layout import TensorMap, tensor_maps
from kanana_jax.convert.safetensors_io import CheckpointError, SafetensorsCheckpoint
from kanana_jax.model import Transformer
from kanana_jax.model.layers import DTYPES

log = logging.getLogger("kanana_jax.convert")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FLOATS = (np.float64, np.float32, np.float16, jnp.bfloat16)


def expected_tree(cfg: ModelConfig):
    """ShapeDtypeStructs of `Transformer(cfg)`'s params (no compute)."""
    model = Transformer(cfg)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    return flax.linen.unbox(shapes)["params"]


def _check_layout(cfg: ModelConfig, maps: list[TensorMap]):
    """Our mapping covers exactly the model's leaves with their shapes (guards against model changes)."""
    want = {k: v.shape for k, v in flax.traverse_util.flatten_dict(expected_tree(cfg)).items()}
    have = {m.path: m.shape for m in maps}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))
        raise RuntimeError(f"internal: the HF layout in kanana_jax/convert/hf_layout.py no longer matches the "
                           f"model's params; differing (path, shape): {diff[:6]}")


def _leaf_dtype(m: TensorMap, param_dtype) -> np.dtype:
    return np.dtype(np.float32) if m.float32 else np.dtype(param_dtype)


def validate(ckpt: SafetensorsCheckpoint, cfg: ModelConfig, maps: list[TensorMap], *, allow_missing_bias: bool):
    """Checks presence, shape and dtype of every tensor from the shard headers before reading any data; lists
    tensors the model does not use (multi-token-prediction layers are skipped with a warning)."""
    needed = set()
    for m in maps:
        for _, name in m.names():
            needed.add(name)
            if name.endswith("e_score_correction_bias") and allow_missing_bias and name not in ckpt.weight_map:
                continue
            shape, dtype = ckpt.shape_dtype(name)
            if tuple(shape) != tuple(m.hf_shape):
                raise CheckpointError(f"tensor {name!r} in {ckpt.file_of(name)} has shape {list(shape)}, expected "
                                      f"{list(m.hf_shape)} for the config.json of {ckpt.directory}")
            if dtype not in {np.dtype(d) for d in _FLOATS}:
                raise CheckpointError(f"tensor {name!r} in {ckpt.file_of(name)} has dtype {dtype}; expected a float "
                                      "(quantized checkpoints are not supported)")
    extra = [n for n in ckpt.names() if n not in needed]
    mtp = [n for n in extra if _LAYER.match(n) and int(_LAYER.match(n).group(1)) >= cfg.n_layers]
    ignorable = [n for n in extra if n.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and n == "lm_head.weight")]
    if mtp:
        log.warning("skipping %d tensors of multi-token-prediction layers (model.layers.%d and above)", len(mtp),
                    cfg.n_layers)
    unexpected = sorted(set(extra) - set(mtp) - set(ignorable))
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} tensors of {ckpt.directory} are not used by the model, e.g. "
                              f"{unexpected[:5]} in {ckpt.file_of(unexpected[0])}; the checkpoint does not match "
                              "its config.json")


def _read(ckpt: SafetensorsCheckpoint, m: TensorMap, idx: tuple, allow_missing_bias: bool) -> np.ndarray:
    name = m.hf_name(idx)
    if allow_missing_bias and name.endswith("e_score_correction_bias") and name not in ckpt.weight_map:
        return np.zeros(m.inner, np.float32)
    return m.to_ours(ckpt.get(name))


def read_block(ckpt: SafetensorsCheckpoint, m: TensorMap, index: tuple, dtype, allow_missing_bias=False):
    """The block `index` (a tuple of slices over m.shape) of our leaf, read from just the HF tensors it covers."""
    index = tuple(index) + (slice(None),) * (len(m.shape) - len(index))
    n_outer = len(m.outer)
    outer = [range(*s.indices(n)) for s, n in zip(index[:n_outer], m.outer)]
    inner = index[n_outer:]
    inner_shape = [len(range(*s.indices(n))) for s, n in zip(inner, m.inner)]
    out = np.empty([len(r) for r in outer] + inner_shape, dtype)
    for pos in np.ndindex(*[len(r) for r in outer]):
        idx = tuple(r[p] for r, p in zip(outer, pos))
        out[pos] = _read(ckpt, m, idx, allow_missing_bias)[inner].astype(dtype)
    return out


def import_params(ckpt: SafetensorsCheckpoint, cfg: ModelConfig, *, interleaved: bool = True,
                  shardings=None, allow_missing_bias: bool = False):
    """Our param tree for `cfg` from `ckpt` (leaves in cfg.param_dtype; router kernel/bias float32), placed
    with `shardings` (a matching tree of jax Shardings) or on the default device."""
    maps = tensor_maps(cfg, interleaved=interleaved)
    _check_layout(cfg, maps)
    validate(ckpt, cfg, maps, allow_missing_bias=allow_missing_bias)
    flat_shardings = flax.traverse_util.flatten_dict(shardings) if shardings is not None else {}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    flat = {}
    for m in maps:
        dtype = _leaf_dtype(m, DTYPES[cfg.param_dtype])
        sharding = flat_shardings.get(m.path, default)
        callback = functools.partial(read_block, ckpt, m, dtype=dtype, allow_missing_bias=allow_missing_bias)
        flat[m.path] = jax.make_array_from_callback(m.shape, sharding, callback)
    return flax.traverse_util.unflatten_dict(flat)


def load_hf_checkpoint(directory: str, *, shardings=None, ignore_fields=(), **overrides):
    """(ModelConfig, params, config.json dict) of a HuggingFace DeepSeek-V3 checkpoint directory. `overrides`
    set non-architecture ModelConfig fields, e.g. param_dtype='bfloat16', dtype='bfloat16', moe_impl=...;
    `shardings` may be a tree or a function ModelConfig -> tree (e.g. from the trainer's mesh)."""
    hf = hf_config.read_hf_config(directory)
    cfg = hf_config.model_config_from_hf(hf, ignore_fields=ignore_fields, **overrides)
    ckpt = SafetensorsCheckpoint(directory)
    if callable(shardings):
        shardings = shardings(cfg)
    method = hf.get("topk_method", "noaux_tc" if hf.get("scoring_func", "sigmoid") == "sigmoid" else "greedy")
    params = import_params(ckpt, cfg, interleaved=hf_config.rope_interleaved(hf), shardings=shardings,
                           allow_missing_bias=method != "noaux_tc")
    return cfg, params, hf
