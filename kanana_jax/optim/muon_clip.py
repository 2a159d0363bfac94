"""MuonClip (QK-clip, Kimi K2): rescale the query/key projections of every head whose max logit exceeds tau.

Input: the params tree and the model's sown `intermediates` (per attention module `max_logits` [*layers, H], the
max pre-softmax scaled logit of each head over batch and positions, before any soft-cap). For a head with
S > tau let eta = tau / S; the head's logits q.k are multiplied by exactly eta:

MLA   q "nope" columns and k "nope" columns (wkv_b's first Dnope outputs of the head) by sqrt(eta), the head's
      q rope columns by eta; the rope key (wkv_a's last Drope columns, shared by all heads) is untouched.
GQA   a key head is shared by H/KVH query heads, so it takes sqrt(min eta of its group) and each query head
      eta / sqrt(min eta of its group): every head's logits scale by its own eta (with KVH = H this is
      sqrt(eta) on both W_q and W_k).

Pure function of trees, jit-able; apply it inside the step after the optimizer update.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _unwrap(leaf):
    """Linen sow stores a tuple of values; the max over repeated calls."""
    if isinstance(leaf, (tuple, list)):
        out = leaf[0]
        for v in leaf[1:]:
            out = jnp.maximum(out, v)
        return out
    return leaf


def _find_attention(tree, path=()):
    """[(path to the attention module, max_logits [*lead, H])] in an intermediates tree."""
    found = []
    if isinstance(tree, dict):
        if "max_logits" in tree:
            found.append((path, _unwrap(tree["max_logits"])))
        for k, v in tree.items():
            if k != "max_logits":
                found.extend(_find_attention(v, path + (k,)))
    return found


def _get(tree, path):
    for k in path:
        if k not in tree:
            raise KeyError(f"MuonClip: params have no {'/'.join(path)} (from the sown max_logits); "
                           "params and intermediates must come from the same model")
        tree = tree[k]
    return tree


def _set(tree, path, value):
    if not path:
        return value
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def _scale_heads(w, scale_HxK):
    """w [*lead, in, H, K] * scale [*lead, H, K] broadcast over the input axis."""
    return (w.astype(jnp.float32) * scale_HxK[..., None, :, :]).astype(w.dtype)


def _clip_mla(attn, eta):
    lat = attn["kv_norm"]["scale"].shape[-1]
    d_rope = attn["wkv_a"].shape[-1] - lat
    qname = "wq" if "wq" in attn else "wq_b"
    d_qk = attn[qname].shape[-1]
    d_nope = d_qk - d_rope
    if d_nope < 0 or attn["wkv_b"].shape[-1] < d_nope:
        raise ValueError(f"MuonClip: inconsistent MLA shapes {qname} {attn[qname].shape}, wkv_a {attn['wkv_a'].shape}, "
                         f"wkv_b {attn['wkv_b'].shape}, kv_norm {lat}")
    root = jnp.sqrt(eta)[..., None]                                    # [*lead, H, 1]
    q_scale = jnp.concatenate([jnp.broadcast_to(root, eta.shape + (d_nope,)),
                               jnp.broadcast_to(eta[..., None], eta.shape + (d_rope,))], axis=-1)
    d_v = attn["wkv_b"].shape[-1] - d_nope
    k_scale = jnp.concatenate([jnp.broadcast_to(root, eta.shape + (d_nope,)),
                               jnp.ones(eta.shape + (d_v,), jnp.float32)], axis=-1)
    return {**attn, qname: _scale_heads(attn[qname], q_scale), "wkv_b": _scale_heads(attn["wkv_b"], k_scale)}


def _clip_gqa(attn, eta):
    h, kvh = attn["wq"].shape[-2], attn["wk"].shape[-2]
    if h % kvh:
        raise ValueError(f"MuonClip: {h} query heads are not a multiple of {kvh} key heads")
    eta_g = eta.reshape(eta.shape[:-1] + (kvh, h // kvh))
    k_root = jnp.sqrt(jnp.min(eta_g, axis=-1))                          # [*lead, KVH]
    q_scale = (eta_g / k_root[..., None]).reshape(eta.shape)
    dh = attn["wq"].shape[-1]
    return {**attn,
            "wq": _scale_heads(attn["wq"], jnp.broadcast_to(q_scale[..., None], eta.shape + (dh,))),
            "wk": _scale_heads(attn["wk"], jnp.broadcast_to(k_root[..., None], k_root.shape + (dh,)))}


def apply(params, max_logits_tree, tau: float = 100.0):
    """(params with clipped q/k heads, scalar metrics: the max logit overall and per layer
    ('muon_clip/max_logit/<stack>/<layer>'), and the number of heads clipped this step).

    Accepts the bare trees or {'params': ...} / {'intermediates': ...}.
    """
    wrapped = isinstance(params, dict) and set(params) == {"params"}
    p = params["params"] if wrapped else params
    inter = max_logits_tree.get("intermediates", max_logits_tree) if isinstance(max_logits_tree, dict) else {}
    found = _find_attention(inter)
    if not found:
        raise ValueError("MuonClip: no 'max_logits' in the intermediates; apply the model with "
                         "mutable=['intermediates'] and pass the returned state")
    metrics, clipped, overall = {}, jnp.zeros([], jnp.int32), None
    for path, s in found:
        s = s.astype(jnp.float32)
        eta = jnp.where(s > tau, tau / jnp.maximum(s, 1e-30), 1.0)
        attn = _get(p, path)
        new = _clip_mla(attn, eta) if "wkv_b" in attn else _clip_gqa(attn, eta)
        p = _set(p, path, new)
        name = "/".join(k for k in path if k != "attn") or "attn"
        per_layer = jnp.max(s, axis=-1)
        if per_layer.ndim == 0:
            metrics[f"muon_clip/max_logit/{name}"] = per_layer
        for idx in np.ndindex(per_layer.shape if per_layer.ndim else ()):
            if per_layer.ndim:
                metrics[f"muon_clip/max_logit/{name}/{'/'.join(map(str, idx))}"] = per_layer[idx]
        clipped = clipped + jnp.sum(s > tau).astype(jnp.int32)
        overall = jnp.max(per_layer) if overall is None else jnp.maximum(overall, jnp.max(per_layer))
    metrics["muon_clip/max_logit"] = overall
    metrics["muon_clip/heads_clipped"] = clipped
    return ({"params": p} if wrapped else p), metrics
