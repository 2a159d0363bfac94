"""The weights' fp8 copies, made once per optimizer step instead of once per matmul call (precision.fp8_prequantize).

Every fp8 matmul site quantizes its weight: amax pass, cast, and the layout the fp8 GEMM reads (model/fp8.py:
both operands contraction-minor; pallas_kernels/moe/fp8.py: experts as [E, N, K] forward, [E, K, N] for dlhs).
With gradient accumulation the weights do not change between microbatches, so the step
(kanana_jax/train/step.py) calls `prequantize` once, before its microbatch loop, and the model reads the copies
from the 'fp8_weights' collection (model/fp8.py `prequantized`), sliced per layer by nn.scan like the params.
The weight itself stays the sites' differentiable input: dW is what it is with per-call quantization, and the
copies are the same values a site would make (same cast to model.dtype, same scales), so loss and gradients do
not change (tests/test_fp8_prequantize.py).

    prequantize(params, recipe, model_cfg, fp8_meta) -> {path: copies} mirroring params, for the sites only
      routed experts  .../experts/w_{gate,up,down} [..., E, K, N] -> {'q', 'q_t' [..., E, N, K], 's' [..., E]}
      dense sites     .../attn/w*, .../mlp/w_*, .../shared/w_*, lm_head/kernel (recipe.lm_head)
                      [..., K..., N...] -> {'q' [..., K, N], 'q_t' [..., N, K], 's' [...], 'amax' [...]}
                      with K = the dims the site contracts (2 for attn/wo, else 1), scales from the w row of
                      the site's amax history under delayed scaling (as the site would scale it)
Leading dims are the layer axis of a scanned stack (model.scan_layers): one scale per layer (and expert).
Memory: the copies of all sites live for the whole step, two bytes per weight element (both layouts); with
per-call quantization only the layer being computed has its transposed copy.
"""
from __future__ import annotations

import math
import re

import jax

from kanana_jax.config import ModelConfig
from kanana_jax.model import fp8
from kanana_jax.model.layers import DTYPES

_EXPERTS = re.compile(r"(^|/)experts/w_(gate|up|down)$")
_DENSE = re.compile(r"(^|/)(attn/w[a-z_]*|mlp/w_(gate|up|down)|shared/w_(gate|up|down))$")
_LM_HEAD = re.compile(r"^lm_head/kernel$")
_TWO_CONTRACTED = re.compile(r"(^|/)attn/wo$")  # [H, Dv, D]: the output projection contracts heads and head dim
_SCANNED_STACKS = ("dense_layers", "moe_layers")  # model/transformer.layer_stacks' names under nn.scan


def _keys(path) -> tuple:
    return tuple(str(getattr(p, "key", p)) for p in path)


def _lookup(tree, keys):
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def prequantize(params, recipe: fp8.Fp8Recipe | None, model_cfg: ModelConfig, fp8_meta=None) -> dict:
    """The 'fp8_weights' collection for `params` (nested dicts mirroring params, sites only; {} without a
    recipe). `fp8_meta`: the train state's amax histories (delayed scaling)."""
    if recipe is None:
        return {}
    dt = DTYPES[model_cfg.dtype]
    out: dict = {}

    def visit(path, w):
        keys = _keys(path)
        name = "/".join(keys)
        if _EXPERTS.search(name):
            from pallas_kernels.moe.fp8 import quantize_weights
            q, q_t, s = quantize_weights(w.astype(dt))
            copies = {"q": q, "q_t": q_t, "s": s}
        elif _DENSE.search(name) or (recipe.lm_head and _LM_HEAD.search(name)):
            lead = 1 if model_cfg.scan_layers and any(k in _SCANNED_STACKS for k in keys) else 0
            n_contract = 2 if _TWO_CONTRACTED.search(name) else 1
            k = math.prod(w.shape[lead:lead + n_contract])
            n = math.prod(w.shape[lead + n_contract:])
            history = _lookup(fp8_meta, keys) if recipe.delayed else None
            copies = fp8.quantize_weight(w.astype(dt).reshape(w.shape[:lead] + (k, n)),
                                         None if history is None else history[..., 1, :], recipe.delayed)
        else:
            return
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = copies

    jax.tree_util.tree_map_with_path(visit, params)
    return out
