"""Our ModelConfig + param tree -> a HuggingFace DeepSeek-V3 checkpoint directory (config.json, sharded
safetensors + index), loadable by transformers' DeepseekV3ForCausalLM and vLLM.

Tensors are produced one at a time (sliced from the device arrays) while the shard files are written, so
host memory holds one tensor (plus leaves small enough to cache) at a time.

    export_hf(params, cfg, "/out/kanana-sft", dtype="bfloat16", base_dir="/ckpt/kanana-2-30b-a3b-base")
"""
from __future__ import annotations

import json
import os
import re
import shutil

import flax
import jax
import numpy as np

from kanana_jax.config import ModelConfig
from kanana_jax.convert import hf_config
from kanana_jax.convert.hf_layout import TensorMap, tensor_maps
from kanana_jax.convert.safetensors_io import INDEX_FILE, SINGLE_FILE, plan_shards, write_shard
from kanana_jax.model.layers import DTYPES

# Files copied from `base_dir` next to the weights (tokenizer, chat template, generation defaults).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja", "chat_template.json")
_CACHE_BYTES = 1 << 30
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(?:mlp\.experts\.(\d+)\.)?")


def _order(name: str):
    """HF-like tensor order: embeddings, then layer by layer (experts in order), then final norm and head."""
    m = _LAYER.match(name)
    if m is None:
        return (0 if name.startswith("model.embed") else 2, -1, -1, name)
    return (1, int(m.group(1)), int(m.group(2) or -1), name)


class _Source:
    """Produces HF tensors from our (possibly sharded) leaves; small leaves are fetched to host once."""

    def __init__(self, params, maps: list[TensorMap], dtype):
        self.flat = flax.traverse_util.flatten_dict(params)
        self.cache, self.dtype, self.by_name = {}, dtype, {}
        for m in maps:
            if m.path not in self.flat:
                raise KeyError(f"params lack {'/'.join(m.path)}: they do not belong to this ModelConfig")
            if tuple(self.flat[m.path].shape) != m.shape:
                raise ValueError(f"param {'/'.join(m.path)} has shape {tuple(self.flat[m.path].shape)}, the config "
                                 f"implies {m.shape}")
            for idx, name in m.names():
                self.by_name[name] = (m, idx)

    def out_dtype(self, m: TensorMap, leaf) -> np.dtype:
        if m.float32:
            return np.dtype(np.float32)
        return np.dtype(self.dtype) if self.dtype is not None else np.dtype(leaf.dtype)

    def entries(self):
        out = []
        for name, (m, _) in self.by_name.items():
            out.append((name, m.hf_shape, self.out_dtype(m, self.flat[m.path])))
        return sorted(out, key=lambda e: _order(e[0]))

    def __call__(self, name: str) -> np.ndarray:
        m, idx = self.by_name[name]
        leaf = self.flat[m.path]
        if m.path not in self.cache and leaf.size * leaf.dtype.itemsize <= _CACHE_BYTES:
            self.cache[m.path] = np.asarray(jax.device_get(leaf))
        block = self.cache[m.path][idx] if m.path in self.cache else np.asarray(jax.device_get(leaf[idx]))
        return np.ascontiguousarray(m.to_hf(block)).astype(self.out_dtype(m, leaf))


def export_hf(params, cfg: ModelConfig, out_dir: str, *, dtype: str | None = None, base_config: dict | None = None,
              base_dir: str | None = None, max_shard_bytes: int = 5 << 30) -> list[str]:
    """Writes `params` of `cfg` as a HF DeepSeek-V3 checkpoint in `out_dir`; `dtype` ('float32'|'bfloat16', default:
    each leaf's own) applies to all but the float32 router; `base_config` / `base_dir` carry over the original
    checkpoint's token ids, rope column layout (rope_interleave) and tokenizer files. Returns the written file names."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(DTYPES)} or None (keep each parameter's dtype)")
    if base_dir is not None and base_config is None:
        base_config = hf_config.read_hf_config(base_dir)
    interleaved = hf_config.rope_interleaved(base_config or {})
    maps = tensor_maps(cfg, interleaved=interleaved)
    source = _Source(params, maps, DTYPES[dtype] if dtype else None)
    bias_used = cfg.score_func == "sigmoid" or any(
        bool(np.any(np.asarray(jax.device_get(leaf)) != 0)) for path, leaf in source.flat.items()
        if path[-2:] == ("router", "bias"))
    if not bias_used:
        source.by_name = {n: v for n, v in source.by_name.items() if not n.endswith("e_score_correction_bias")}
    torch_dtype = dtype or cfg.param_dtype
    config = hf_config.hf_config_from_model(cfg, base_config, torch_dtype=torch_dtype, router_bias_used=bias_used,
                                          interleaved=interleaved)
    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):
        if stale.endswith(".safetensors") or stale == INDEX_FILE:
            os.remove(os.path.join(out_dir, stale))
    shards = plan_shards(source.entries(), max_shard_bytes)
    weight_map, total, files = {}, 0, []
    for i, entries in enumerate(shards):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(os.path.join(out_dir, file), entries, source)
        weight_map.update({name: file for name, _, _ in entries})
        files.append(file)
    if len(shards) > 1:
        with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        files.append(INDEX_FILE)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    files.append("config.json")
    for side in SIDE_FILES if base_dir else ():
        if os.path.isfile(os.path.join(base_dir, side)):
            shutil.copyfile(os.path.join(base_dir, side), os.path.join(out_dir, side))
            files.append(side)
    return files
