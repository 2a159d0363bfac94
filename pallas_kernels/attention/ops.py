"""Public flash attention: argument checks, backend dispatch, padding, and the custom_vjp around the kernels."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.attention import reference
from pallas_kernels.attention.block_sizes import BlockSizes, default_block_sizes

BACKENDS = ("reference", "tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static parameters of one kernel call."""
    backend: str
    causal: bool
    scale: float
    cap: float | None
    q_len: int
    kv_len: int
    block_sizes: BlockSizes
    interpret: bool


def _kernels(backend):
    """(forward, backward) functions of a kernel backend."""
    if backend == "tpu":
        from pallas_kernels.attention import tpu
        return tpu.forward, tpu.backward
    from pallas_kernels.attention import gpu, gpu_bwd
    return gpu.forward, gpu_bwd.backward


def _pad_rows(x, n, value=0):
    """Pad axis 1 of x up to n rows with value."""
    if x is None or x.shape[1] == n:
        return x
    widths = [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, widths, constant_values=value)


def _padded(cfg: _Config, q, k, v, q_seg, kv_seg):
    """Zero-pad T and S to the kernels' block multiples (padded keys are masked, padded queries see no key)."""
    bs = cfg.block_sizes
    tp = -(-cfg.q_len // bs.q_multiple(cfg.backend)) * bs.q_multiple(cfg.backend)
    sp = -(-cfg.kv_len // bs.kv_multiple(cfg.backend)) * bs.kv_multiple(cfg.backend)
    return (_pad_rows(q, tp), _pad_rows(k, sp), _pad_rows(v, sp), _pad_rows(q_seg, tp, -1),
            _pad_rows(kv_seg, sp, -2), tp)


# The kernel calls sit behind jits keyed by shapes and the static _Config, so equal calls (the layers of an
# unscanned model, model.scan_layers=False) trace and lower one kernel instead of one per call site.
@functools.partial(jax.jit, static_argnums=(0,))
def _run_forward(cfg: _Config, q, k, v, q_seg, kv_seg):
    fwd, _ = _kernels(cfg.backend)
    qp, kp, vp, qsp, ksp, _ = _padded(cfg, q, k, v, q_seg, kv_seg)
    out, lse, max_logits = fwd(qp, kp, vp, qsp, ksp, causal=cfg.causal, scale=cfg.scale, cap=cfg.cap,
                               kv_len=cfg.kv_len, q_len=cfg.q_len, block_sizes=cfg.block_sizes,
                               interpret=cfg.interpret)
    T = cfg.q_len
    return out[:, :T], lse, max_logits[:, :, :T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, q_seg, kv_seg):
    out, _, max_logits = _run_forward(cfg, q, k, v, q_seg, kv_seg)
    return out, max_logits


def _flash_fwd(cfg: _Config, q, k, v, q_seg, kv_seg):
    out, lse, max_logits = _run_forward(cfg, q, k, v, q_seg, kv_seg)
    return (out, max_logits), (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(cfg: _Config, res, cotangents):
    d_out, _ = cotangents              # max_logits carries no gradient
    return (*_run_backward(cfg, *res, d_out), None, None)


@functools.partial(jax.jit, static_argnums=(0,))
def _run_backward(cfg: _Config, q, k, v, q_seg, kv_seg, out, lse, d_out):
    _, bwd = _kernels(cfg.backend)
    qp, kp, vp, qsp, ksp, tp = _padded(cfg, q, k, v, q_seg, kv_seg)
    dq, dk, dv = bwd(qp, kp, vp, qsp, ksp, _pad_rows(out, tp), lse, _pad_rows(d_out.astype(q.dtype), tp),
                     causal=cfg.causal, scale=cfg.scale, cap=cfg.cap, kv_len=cfg.kv_len, q_len=cfg.q_len,
                     block_sizes=cfg.block_sizes, interpret=cfg.interpret)
    S = cfg.kv_len
    return dq[:, :cfg.q_len], dk[:, :S], dv[:, :S]


_flash.defvjp(_flash_fwd, _flash_bwd)


def default_backend() -> str:
    """'tpu' on TPU, 'gpu' on an NVIDIA GPU, else 'reference'."""
    platform = jax.default_backend()
    if platform == "tpu":
        return "tpu"
    if platform in ("gpu", "cuda"):
        return "gpu"
    return "reference"


def _split_segments(segment_ids, B, T, S):
    """segment_ids [B,T] (self-attention, T == S) or (q_ids [B,T], kv_ids [B,S]) -> int32 pair or (None, None)."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        q_seg, kv_seg = segment_ids
    else:
        if T != S:
            raise ValueError(f"segment_ids of shape [B,T] need T == S (self-attention); got T={T}, S={S}: pass "
                             "segment_ids=(q_segment_ids[B,T], kv_segment_ids[B,S])")
        q_seg = kv_seg = segment_ids
    if q_seg.shape != (B, T) or kv_seg.shape != (B, S):
        raise ValueError(f"segment ids must be [B,T]={B, T} and [B,S]={B, S}; got {q_seg.shape} and {kv_seg.shape}")
    return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def flash_attention(q, k, v, *, causal=True, sm_scale=None, logit_soft_cap=None, segment_ids=None,
                    return_max_logits=False, block_sizes=None, backend=None, interpret=False):
    """Attention of q[B,T,H,Dqk] over k[B,S,KVH,Dqk], v[B,S,KVH,Dv] -> out[B,T,H,Dv] (and max_logits[B,H,T] f32).

    causal: query t sees key s iff s <= t + (S - T). logit_soft_cap: logits become cap * tanh(logit / cap).
    segment_ids: [B,T] ids (needs T == S) or a (q_ids[B,T], kv_ids[B,S]) pair; queries see keys of their id only.
    max_logits: per query row, max over visible keys of the scaled logit before soft-capping (-inf if none;
    no gradient). backend: 'reference' | 'tpu' | 'gpu' | None (by platform). interpret: run the Pallas kernel in
    interpret mode on CPU (TPU interpret mode for 'tpu', Mosaic GPU interpret mode for 'gpu').
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B,T,H,D], [B,S,KVH,D], [B,S,KVH,Dv]; got {q.shape}, {k.shape}, {v.shape}")
    B, T, H, Dqk = q.shape
    S, KVH = k.shape[1], k.shape[2]
    if k.shape[0] != B or v.shape[:3] != k.shape[:3] or k.shape[3] != Dqk:
        raise ValueError(f"k must be [B={B},S,KVH,Dqk={Dqk}] and v [B,S,KVH,Dv] with k's S and KVH; got k {k.shape}, "
                         f"v {v.shape}")
    if H % KVH:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads KVH={KVH}")
    scale = float(Dqk ** -0.5 if sm_scale is None else sm_scale)
    if not scale > 0:
        raise ValueError(f"sm_scale must be > 0; got {sm_scale}")
    cap = None if logit_soft_cap is None else float(logit_soft_cap)
    if cap is not None and not cap > 0:
        raise ValueError(f"logit_soft_cap must be > 0 or None; got {logit_soft_cap}")
    q_seg, kv_seg = _split_segments(segment_ids, B, T, S)
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {BACKENDS} or None (pick by platform)")
    if backend == "reference":
        out, max_logits, _ = reference.attention_reference(
            q, k, v, causal=causal, sm_scale=scale, logit_soft_cap=cap, q_segment_ids_BxT=q_seg,
            kv_segment_ids_BxS=kv_seg)
    else:
        block_sizes = default_block_sizes(backend, Dqk, v.shape[-1]) if block_sizes is None else block_sizes
        if not isinstance(block_sizes, BlockSizes):
            raise ValueError(f"block_sizes must be a BlockSizes; got {type(block_sizes).__name__}")
        if backend == "gpu":
            from pallas_kernels.attention.gpu import check_gpu_shapes
            check_gpu_shapes(q, k, v, block_sizes, has_seg=q_seg is not None)
        else:
            from pallas_kernels.attention.tpu import check_tpu_shapes
            check_tpu_shapes(q, k, v, block_sizes)
        cfg = _Config(backend, bool(causal), scale, cap, T, S, block_sizes, bool(interpret))
        out, max_logits = _flash(cfg, q, k, v, q_seg, kv_seg)
    return (out, max_logits) if return_max_logits else out
