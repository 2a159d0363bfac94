"""Mosaic GPU flash attention in Mosaic GPU interpret mode on CPU: forward, max logits and gradients vs the
reference. Speed and the real wgmma/TMA path run on the H200 via benchmarks/attention.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import compare_with_reference, packed_ids
from pallas_kernels.attention import BlockSizes, flash_attention
from pallas_kernels.attention import gpu_common as gc

SMALL = BlockSizes(block_kv=64, block_q_dkv=64, block_kv_dq=64)
# Pairwise cover of GQA 1/4/8, soft-cap on/off, causal on/off, segment ids, Dqk/Dv 128/128, 192/128, 64/64, T and S
# not multiples of the block; default blocks (None) and a 3-deep ring. bf16 only: wgmma has no f32 operands here.
CASES = [
    dict(B=1, T=256, S=256, H=2, KVH=2, Dqk=128, Dv=128, causal=True, cap=50.0, seg=False, block_sizes=None),
    dict(B=1, T=200, S=200, H=4, KVH=1, Dqk=64, Dv=64, causal=False, cap=None, seg=True,
         block_sizes=BlockSizes(block_kv=64, block_q_dkv=64, block_kv_dq=64, num_stages=3)),
    dict(B=1, T=130, S=130, H=8, KVH=1, Dqk=192, Dv=128, causal=True, cap=5.0, seg=True, block_sizes=SMALL),
    dict(B=2, T=100, S=300, H=2, KVH=2, Dqk=64, Dv=64, causal=True, cap=None, seg=False, block_sizes=SMALL),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "G{}_cap{}_causal{}_seg{}_d{}x{}_T{}S{}".format(
    c["H"] // c["KVH"], c["cap"], c["causal"], c["seg"], c["Dqk"], c["Dv"], c["T"], c["S"]))
def test_gpu_kernel_matches_reference(case):
    compare_with_reference("gpu", seed=sum(map(ord, str(case))) % 1000, dtype=jnp.bfloat16, **case)


# The fused backward (dQ by reduce-add from the dK/dV kernel) is what the GPU backward uses at Dqk <= 64, which the
# cases above cover; the kernel itself is general, so it is also checked where the split backward is used: GQA 4
# with soft-cap, segment ids and a padded T, and MLA head dims (dQ stored in 32-column halves there).
FUSED_WIDE = [
    dict(B=1, T=200, S=200, H=4, KVH=1, Dqk=128, Dv=128, causal=True, cap=20.0, seg=True, block_sizes=None),
    dict(B=1, T=192, S=192, H=2, KVH=2, Dqk=192, Dv=128, causal=False, cap=None, seg=False, block_sizes=None),
]


@pytest.mark.parametrize("case", FUSED_WIDE, ids=["G4_cap_seg_d128", "mla_noncausal"])
def test_fused_backward_matches_reference_at_wide_heads(case, monkeypatch):
    from pallas_kernels.attention import gpu_bwd
    monkeypatch.setattr(gpu_bwd, "fused_preferred", lambda d_qk: True)
    compare_with_reference("gpu", seed=sum(map(ord, str(case))) % 1000, dtype=jnp.bfloat16, **case)


def test_gpu_kernel_rejects_float32_and_odd_head_dims():
    q = jnp.ones((1, 128, 1, 64), jnp.float32)
    with pytest.raises(ValueError, match="bfloat16 or all float16"):
        flash_attention(q, q, q, backend="gpu", interpret=True)
    q = jnp.ones((1, 128, 1, 96), jnp.bfloat16)
    with pytest.raises(ValueError, match="Dqk a multiple of 64"):
        flash_attention(q, q, q, backend="gpu", interpret=True)


def test_gpu_kernel_runs_dqk_256_where_shared_memory_fits():
    """Issue 24: Dqk=256 works with Dv <= 128 (default blocks: 64-row rings); the H200 checks it too
    (`benchmarks/attention.py --wide-heads`)."""
    compare_with_reference("gpu", seed=3, B=1, T=128, S=128, H=1, KVH=1, Dqk=256, Dv=128, dtype=jnp.bfloat16,
                           causal=True, cap=50.0, seg=False)


@pytest.mark.parametrize("dqk,dv,seg", [(256, 256, False), (256, 192, False), (192, 256, True)])
def test_gpu_kernel_names_the_shared_memory_limit(dqk, dv, seg):
    """These pass the head-dim rule but not 227 KB of shared memory (on the H200, 256/256 and 256/192 failed inside
    Mosaic GPU before this check): the error says so, before Mosaic."""
    q = jnp.ones((1, 128, 1, dqk), jnp.bfloat16)
    v = jnp.ones((1, 128, 1, dv), jnp.bfloat16)
    ids = jnp.ones((1, 128), jnp.int32) if seg else None
    with pytest.raises(ValueError, match=r"shared memory > 232448.*Dqk \+ Dv <= 384"):
        flash_attention(q, q, v, segment_ids=ids, backend="gpu", interpret=True)


# Packed documents where whole blocks are skipped (segment-aware block ranges). A: GQA 2, causal, a document
# shorter than a block, block-aligned documents (blocks with no mask), padded query tiles with an empty range, a
# 3-deep ring so ring slots differ from block indices. B: non-causal with soft-cap, unsorted query ids, a query
# id no key has (a 64-row query tile with an empty range: out 0, max logit -inf) and a key id no query has (a key
# tile with an empty range: dk = dv = 0), default blocks (forward kv block 128, backward 64).
_QIDS_B = np.concatenate([np.full(60, 1), np.full(100, 0), np.full(96, 5)])[None]
_KVIDS_B = np.concatenate([np.full(50, 0), np.full(80, 1), np.full(126, 2)])[None]
PACKED = {
    "causal_G2_docs": dict(B=2, T=320, S=320, H=2, KVH=1, Dqk=64, Dv=64, causal=True, cap=None,
                           seg=packed_ids((20, 150, 30, 120), (64, 64, 192)),
                           block_sizes=BlockSizes(block_kv=64, block_q_dkv=64, block_kv_dq=64, num_stages=3)),
    "noncausal_G4_cap_empty_tiles": dict(B=1, T=256, S=256, H=4, KVH=1, Dqk=128, Dv=128, causal=False, cap=30.0,
                                         seg=(_QIDS_B, _KVIDS_B), block_sizes=None),
}


@pytest.mark.parametrize("name", list(PACKED))
def test_gpu_kernel_skips_blocks_of_other_documents(name):
    compare_with_reference("gpu", seed=sum(map(ord, name)) % 1000, dtype=jnp.bfloat16, **PACKED[name])


def _brute_force_visibility(rows_seg, cols_seg, row_tile, col_block, rows_are_q, causal_offset, kv_len):
    """[B, R/row_tile, C/col_block] (any pair visible, all pairs visible) from the element-wise mask."""
    B, R = rows_seg.shape
    C = cols_seg.shape[1]
    r, c = np.arange(R)[:, None], np.arange(C)[None, :]
    q, k = (r, c) if rows_are_q else (c, r)
    vis = (rows_seg[:, :, None] == cols_seg[:, None, :]) & (k < kv_len)
    if causal_offset is not None:
        vis &= k <= q + causal_offset
    blocks = vis.reshape(B, R // row_tile, row_tile, C // col_block, col_block)
    return blocks.any(axis=(2, 4)), blocks.all(axis=(2, 4))


_block_ranges = jax.jit(gc.block_ranges, static_argnames=("row_tile", "col_block", "rows_are_q", "causal_offset",
                                                          "kv_len"))


# (rows R, columns C, column block, rows are queries, self-attention ids, causal, padded keys)
RANGE_CASES = [(256, 256, 64, True, True, True, 0), (384, 384, 128, True, True, True, 0),
               (256, 256, 64, True, True, False, 0), (384, 384, 64, False, True, True, 0),
               (384, 384, 128, False, True, False, 0), (256, 384, 64, True, False, True, 37),
               (384, 256, 128, True, False, True, 10), (256, 384, 64, False, False, True, 50),
               (384, 128, 64, False, False, False, 20), (128, 384, 128, True, False, False, 0)]


def test_block_ranges_cover_every_visible_block():
    """Bounds vs brute force on sorted and unsorted ids: every block with a visible pair lies in [lo, hi), every
    block of [full_lo, full_hi) is fully visible; for sorted self-attention ids the ranges are exact."""
    rng = np.random.default_rng(3)
    n_exact = 0
    for R, C, col_block, rows_are_q, self_attn, causal, pad in RANGE_CASES:
        q_len, kv_len = (R, C - pad) if rows_are_q else (C, R - pad)
        causal_offset = kv_len - q_len if causal else None
        for draw in range(6):
            sorted_ids = draw % 2 == 0
            rows, cols = (rng.integers(0, int(rng.integers(1, 6)), (2, n)) for n in (R, C))
            if sorted_ids:
                rows, cols = np.sort(rows, axis=1), np.sort(cols, axis=1)
            if self_attn:
                cols = rows.copy()
            got = np.asarray(_block_ranges(jnp.asarray(rows), jnp.asarray(cols), row_tile=64, col_block=col_block,
                                           rows_are_q=rows_are_q, causal_offset=causal_offset, kv_len=kv_len))
            any_vis, all_vis = _brute_force_visibility(rows, cols, 64, col_block, rows_are_q, causal_offset, kv_len)
            nc = C // col_block
            idx = np.arange(nc)
            lo, flo, fhi, hi = (got[..., j][..., None] for j in range(4))
            empty = hi <= lo                               # a tile the kernels do not visit at all
            assert np.all(np.where(empty, (lo == nc) & (hi == 0), (lo <= flo) & (flo <= fhi) & (fhi <= hi)))
            assert not np.any(any_vis & ((idx < lo) | (idx >= hi))), "a block with a visible pair is skipped"
            assert np.all(all_vis | ~((idx >= flo) & (idx < fhi))), "a block run without mask has a hidden pair"
            if sorted_ids and self_attn and rows_are_q and not pad:
                assert np.array_equal(np.where(any_vis, idx, nc).min(-1), got[..., 0])
                assert np.array_equal(np.where(any_vis, idx + 1, 0).max(-1), got[..., 3])
                assert np.array_equal(all_vis, (idx >= flo) & (idx < fhi)), "a fully visible block is masked"
                n_exact += 1
    assert n_exact == 9
