"""Block sizes and group metadata shared by the grouped-matmul kernels (computed in jnp, read by the kernels)."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Block sizes of one kernel call: tm rows of the ragged dim, tk contraction, tn output columns.

    For tgmm (out[E,K,N]) tm is the ragged reduction block, tk the output-row block, tn the output-column block.
    `stages` is the GPU pipeline depth (ignored on TPU).
    """

    tm: int = 128
    tk: int = 64
    tn: int = 256
    stages: int = 4

    def __post_init__(self):
        for name in ("tm", "tk", "tn", "stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Tiling.{name} must be a positive int, got {value!r}")


class GmmTilings(NamedTuple):
    """Tilings of the three calls of one gmm forward+backward: fwd, dlhs (gmm with transposed rhs), drhs (tgmm)."""

    fwd: Tiling | None = None
    dlhs: Tiling | None = None
    drhs: Tiling | None = None


def as_gmm_tilings(tiling) -> GmmTilings:
    """Accepts None, one Tiling (forward only) or a GmmTilings / 3-tuple."""
    if tiling is None:
        return GmmTilings()
    if isinstance(tiling, Tiling):
        return GmmTilings(fwd=tiling)
    if isinstance(tiling, (tuple, list)) and len(tiling) == 3:
        return GmmTilings(*tiling)
    raise TypeError(f"tiling must be None, a Tiling or a (fwd, dlhs, drhs) tuple of Tilings, got {tiling!r}")


def pick_block(dim: int, preferred: tuple[int, ...]) -> int | None:
    """The first of `preferred` (block sizes, best first) that divides dim, else None."""
    return next((b for b in preferred if dim % b == 0), None)


def round_up(a: int, b: int) -> int:
    """a rounded up to a multiple of b."""
    return -(-a // b) * b


def gmm_dims(lhs_MxK, rhs, transpose_rhs: bool) -> tuple[int, int, int, int]:
    """(M, K, N, E) of gmm(lhs[M,K], rhs[E,K,N] or [E,N,K] with transpose_rhs); ValueError if K disagrees."""
    m, k = lhs_MxK.shape
    num_experts, n = rhs.shape[0], (rhs.shape[1] if transpose_rhs else rhs.shape[2])
    if (rhs.shape[2] if transpose_rhs else rhs.shape[1]) != k:
        raise ValueError(f"gmm: lhs is [M={m}, K={k}] but rhs is {rhs.shape} (transpose_rhs={transpose_rhs})")
    return m, k, n, num_experts


def group_offsets(group_sizes_E: jax.Array) -> jax.Array:
    """[E+1] int32 exclusive cumulative sum: rows of group g are [offsets[g], offsets[g+1])."""
    ends = jnp.cumsum(group_sizes_E.astype(jnp.int32))
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])


def with_tail_group(group_sizes_E: jax.Array, m: int) -> jax.Array:
    """[E+1] sizes: the E groups plus a pseudo-group E holding the rows beyond sum(group_sizes) (output zeros)."""
    sizes = group_sizes_E.astype(jnp.int32)
    return jnp.concatenate([sizes, jnp.maximum(m - jnp.sum(sizes), 0)[None]])


class AlignedVisits(NamedTuple):
    """Grid metadata for kernels whose m tiles are aligned to multiples of tm (the TPU kernels).

    Visit v works on group group_ids[v] and m tile m_tile_ids[v]; visits past num_visits repeat the last valid one.
    A tile straddling a group boundary is visited once per group it holds rows of, consecutively.
    """

    offsets: jax.Array  # [G+1] int32
    group_ids: jax.Array  # [V] int32
    m_tile_ids: jax.Array  # [V] int32
    num_visits: jax.Array  # [1] int32


def aligned_visits(sizes_G: jax.Array, m: int, tm: int, *, visit_empty: bool) -> AlignedVisits:
    """Visits for G groups over cdiv(m, tm) aligned tiles; V = tiles + G - 1 (+ G when visit_empty) statically."""
    num_groups = sizes_G.shape[0]
    tiles_m = pl_cdiv(m, tm)
    offsets = group_offsets(sizes_G)
    starts, ends = offsets[:-1], offsets[1:]
    first_tile = jnp.minimum(starts // tm, tiles_m - 1)
    last_tile = jnp.maximum(ends - 1, 0) // tm
    n_visits = jnp.where(sizes_G > 0, last_tile - first_tile + 1, 1 if visit_empty else 0)
    cum = jnp.cumsum(n_visits)
    num_visits = cum[-1]
    v_max = tiles_m + num_groups - 1 + (num_groups if visit_empty else 0)
    v = jnp.minimum(jnp.arange(v_max, dtype=jnp.int32), jnp.maximum(num_visits - 1, 0))
    gid = jnp.searchsorted(cum, v, side="right", method="compare_all").astype(jnp.int32)
    gid = jnp.minimum(gid, num_groups - 1)
    m_tile = first_tile[gid] + v - (cum[gid] - n_visits[gid])
    return AlignedVisits(offsets, gid, m_tile.astype(jnp.int32), num_visits.astype(jnp.int32)[None])


class GroupTiles(NamedTuple):
    """Metadata for kernels whose m tiles follow group starts (the GPU kernels): no tile computes two groups.

    Tile t loads rows [row_start[t], row_start[t] + tm) (row_start a multiple of `align`) and owns rows
    [row_start[t] + lo[t], row_start[t] + hi[t]) of group group_ids[t]; hi[t] == 0 marks an unused tile.
    """

    group_ids: jax.Array  # [T] int32
    row_start: jax.Array  # [T] int32
    lo: jax.Array  # [T] int32
    hi: jax.Array  # [T] int32


def group_tiles(sizes_G: jax.Array, tm: int, max_tiles: int, align: int = 1) -> GroupTiles:
    """Tiles of tm rows starting at each group's start rounded down to `align`, in group order."""
    num_groups = sizes_G.shape[0]
    offsets = group_offsets(sizes_G)
    starts, ends = offsets[:-1], offsets[1:]
    base = starts // align * align
    n_tiles = jnp.where(sizes_G > 0, (ends - base + tm - 1) // tm, 0)
    cum = jnp.cumsum(n_tiles)
    t = jnp.arange(max_tiles, dtype=jnp.int32)
    gid = jnp.searchsorted(cum, t, side="right", method="compare_all").astype(jnp.int32)
    gid = jnp.minimum(gid, num_groups - 1)
    row_start = base[gid] + (t - (cum[gid] - n_tiles[gid])) * tm
    used = t < cum[-1]
    lo = jnp.where(used, jnp.clip(starts[gid] - row_start, 0, tm), 0)
    hi = jnp.where(used, jnp.clip(ends[gid] - row_start, 0, tm), 0)
    return GroupTiles(gid, row_start.astype(jnp.int32), lo.astype(jnp.int32), hi.astype(jnp.int32))


def max_group_tiles(m: int, tm: int, num_groups: int, align: int = 1) -> int:
    """Upper bound of the number of group_tiles over num_groups groups whose sizes sum to at most m."""
    return pl_cdiv(m + (align - 1) * num_groups, tm) + num_groups - 1


def pl_cdiv(a: int, b: int) -> int:
    """Ceiling division of Python ints."""
    return -(-a // b)


def padded_group_offsets(group_sizes_E: jax.Array, align: int) -> jax.Array:
    """[E+1] int32 offsets of the group-padded layout: group g owns [offsets[g], offsets[g+1]), its size rounded
    up to a multiple of `align` (the rows/columns past its size are zeros), so every `align` block is one group's."""
    padded = round_up_array(group_sizes_E.astype(jnp.int32), align)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(padded)])


def round_up_array(a: jax.Array, b: int) -> jax.Array:
    """a rounded up to a multiple of b, elementwise (int arrays)."""
    return (a + b - 1) // b * b


def padded_group_len(m: int, num_groups: int, align: int) -> int:
    """Static length of the group-padded layout of num_groups groups summing to at most m: a multiple of align."""
    return round_up(m + num_groups * (align - 1), align)


def padded_group_rows(group_sizes_E: jax.Array, m: int, align: int) -> tuple[jax.Array, jax.Array]:
    """(src [P] int32, valid [P] bool) of the group-padded layout of m rows, P = padded_group_len(m, E, align):
    position p holds row src[p] where valid[p], else a zero (padding, or past the last group)."""
    num_groups = group_sizes_E.shape[0]
    length = padded_group_len(m, num_groups, align)
    poff = padded_group_offsets(group_sizes_E, align)
    off = group_offsets(group_sizes_E)
    p = jnp.arange(length, dtype=jnp.int32)
    g = jnp.searchsorted(poff[1:], p, side="right", method="compare_all").astype(jnp.int32)
    g_safe = jnp.minimum(g, num_groups - 1)
    rank = p - poff[g_safe]
    valid = (g < num_groups) & (rank < group_sizes_E.astype(jnp.int32)[g_safe])
    return jnp.where(valid, off[g_safe] + rank, 0).astype(jnp.int32), valid
