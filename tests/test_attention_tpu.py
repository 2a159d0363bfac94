"""TPU (Mosaic) flash attention in TPU interpret mode on CPU: forward, max logits and gradients vs the reference."""
import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import compare_with_reference, make_inputs, packed_ids
from pallas_kernels.attention import BlockSizes, flash_attention
from pallas_kernels.attention import tpu

# Pairwise cover of the matrix: GQA 1/4/8, soft-cap on/off, causal on/off, segment ids,
# Dqk/Dv 128/128, 192/128, 64/64, T and S not multiples of the block, bf16 and fp32.
CASES = [
    dict(B=1, T=256, S=256, H=2, KVH=2, Dqk=128, Dv=128, dtype=jnp.bfloat16, causal=True, cap=50.0, seg=False),
    dict(B=1, T=200, S=200, H=4, KVH=1, Dqk=64, Dv=64, dtype=jnp.float32, causal=False, cap=None, seg=True),
    dict(B=1, T=130, S=130, H=8, KVH=1, Dqk=192, Dv=128, dtype=jnp.bfloat16, causal=True, cap=5.0, seg=True),
    dict(B=2, T=100, S=300, H=2, KVH=2, Dqk=64, Dv=64, dtype=jnp.float32, causal=True, cap=None, seg=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "G{}_cap{}_causal{}_seg{}_d{}x{}_T{}S{}_{}".format(
    c["H"] // c["KVH"], c["cap"], c["causal"], c["seg"], c["Dqk"], c["Dv"], c["T"], c["S"], c["dtype"].__name__))
def test_tpu_kernel_matches_reference(case):
    compare_with_reference("tpu", seed=sum(map(ord, str(case))) % 1000, **case)


def test_tpu_kernel_multi_block_grid():
    """Several query/key blocks per row and column (skipped causal blocks, GQA head loop in dK/dV)."""
    bs = BlockSizes(block_q=128, block_kv=128, block_q_dkv=128, block_kv_dkv=256, block_q_dq=256, block_kv_dq=128)
    compare_with_reference("tpu", seed=11, B=1, T=384, S=384, H=4, KVH=2, Dqk=64, Dv=64, dtype=jnp.float32,
                           causal=True, cap=20.0, seg=True, block_sizes=bs, scale=0.2)


def test_tpu_block_sizes_must_be_lane_multiples():
    q = jnp.ones((1, 128, 1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_kv a multiple of 128"):
        flash_attention(q, q, q, backend="tpu", block_sizes=BlockSizes(block_kv=64), interpret=True)


# Packed documents: segment-aware block skipping (tpu.segment_bounds, scalar-prefetched). A: causal GQA 2, documents
# shorter than a block, different tiles for the dK/dV (256 keys) and dQ (256 queries) kernels, T padded to 512.
# B: non-causal with soft-cap, 5 documents, T=300 not a block multiple (padded query tile). C: a query id no key has
# (query tile 2 has an empty range: out 0, max logit -inf) and a key id no query has (key tile 2: dk = dv = 0).
_QIDS_C = np.concatenate([np.full(60, 1), np.full(100, 0), np.full(224, 5)])[None]
_KVIDS_C = np.concatenate([np.full(50, 0), np.full(80, 1), np.full(254, 2)])[None]
PACKED = {
    "causal_G2_docs_mixed_tiles": dict(
        B=2, T=384, S=384, H=4, KVH=2, Dqk=64, Dv=64, dtype=jnp.float32, causal=True, cap=None,
        seg=packed_ids((40, 200, 60, 84), (100, 28, 256)), block_sizes=BlockSizes(block_kv_dkv=256, block_q_dq=256)),
    "noncausal_G4_cap_T300": dict(B=1, T=300, S=300, H=4, KVH=1, Dqk=128, Dv=128, dtype=jnp.bfloat16, causal=False,
                                  cap=30.0, seg=packed_ids((10, 90, 130, 50, 20))),
    "noncausal_empty_tiles": dict(B=1, T=384, S=384, H=2, KVH=2, Dqk=64, Dv=64, dtype=jnp.float32, causal=False,
                                  cap=None, seg=(_QIDS_C, _KVIDS_C)),
}


@pytest.mark.parametrize("name", list(PACKED))
def test_tpu_kernel_skips_blocks_of_other_documents(name):
    compare_with_reference("tpu", seed=sum(map(ord, name)) % 1000, **PACKED[name])


def test_tpu_segment_bounds_visit_exactly_the_blocks_with_visible_pairs():
    """Causal packed batch at TPU tiles (forward/dQ query tiles, dK/dV key tiles): the kernels visit exactly the blocks
    holding a visible pair and run unmasked exactly the fully visible ones; that is about half the causal blocks."""
    ids = packed_ids((300, 700, 100, 948), (1024, 1024))
    T = ids.shape[1]
    pos = np.arange(T)
    causal_BxTxS = np.broadcast_to(pos[None, None, :] <= pos[None, :, None], (2, T, T))   # [B, query, key]
    vis_BxTxS = (ids[:, :, None] == ids[:, None, :]) & causal_BxTxS
    for row_tile, col_block, rows_are_q in [(128, 128, True), (128, 256, True), (256, 128, False)]:
        flat = tpu.segment_bounds(jnp.asarray(ids), jnp.asarray(ids), row_tile=row_tile, col_block=col_block,
                                  rows_are_q=rows_are_q, causal_offset=0, kv_len=T)
        lo, full_lo, full_hi, hi = np.moveaxis(np.asarray(flat).reshape(2, T // row_tile, 4), -1, 0)
        tiles = lambda m: (m if rows_are_q else np.swapaxes(m, 1, 2)).reshape(
            2, T // row_tile, row_tile, T // col_block, col_block)
        any_vis, all_vis = tiles(vis_BxTxS).any(axis=(2, 4)), tiles(vis_BxTxS).all(axis=(2, 4))
        idx = np.arange(T // col_block)
        assert np.array_equal(any_vis, (idx >= lo[..., None]) & (idx < hi[..., None]))
        assert np.array_equal(all_vis, (idx >= full_lo[..., None]) & (idx < full_hi[..., None]))
        causal_blocks = tiles(causal_BxTxS).any(axis=(2, 4)).sum()
        assert any_vis.sum() < 0.6 * causal_blocks, (any_vis.sum(), causal_blocks)


def test_tpu_kernel_computes_only_the_bounded_blocks(monkeypatch):
    """With every row tile's range emptied the forward visits no block: out 0, max logits -inf (as fully masked rows)."""
    empty = lambda rows, cols, **kw: jnp.broadcast_to(
        jnp.array([cols.shape[1] // kw["col_block"], 0, 0, 0], jnp.int32),
        (rows.shape[0], rows.shape[1] // kw["row_tile"], 4))
    monkeypatch.setattr(tpu, "block_ranges", empty)
    q, k, v, _, segs = make_inputs(3, 1, 256, 256, 2, 1, 64, 64, jnp.float32, packed_ids((100, 156)))
    out, ml = flash_attention(q, k, v, segment_ids=segs, return_max_logits=True, backend="tpu", interpret=True)
    assert np.all(np.asarray(out) == 0.0) and np.all(np.isneginf(np.asarray(ml)))
