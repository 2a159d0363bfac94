"""Frozen, validated block sizes for the flash-attention kernels (rows of q / kv handled per grid step)."""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes in sequence rows.

    Forward: block_q query rows x block_kv key rows. dK/dV kernel: block_kv_dkv stationary key rows, block_q_dkv
    streamed query rows (also in the fused GPU backward). dQ kernel: block_q_dq stationary query rows, block_kv_dq
    streamed key rows. num_stages is the depth of the GPU shared-memory ring. On GPU the stationary blocks are fixed
    at 128 rows (two warpgroups of 64), so block_q, block_kv_dkv and block_q_dq only apply on TPU.
    """
    block_q: int = 128
    block_kv: int = 128
    block_q_dkv: int = 128
    block_kv_dkv: int = 128
    block_q_dq: int = 128
    block_kv_dq: int = 128
    num_stages: int = 2

    def __post_init__(self):
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"BlockSizes.{f.name} must be a positive int; got {val!r}")
            if f.name.startswith("block") and val % 8:
                raise ValueError(f"BlockSizes.{f.name} must be a multiple of 8 (sublane tiling); got {val}")
        if self.num_stages < 2:
            raise ValueError(f"BlockSizes.num_stages must be >= 2 (double buffering); got {self.num_stages}")

    def q_multiple(self, backend: str) -> int:
        """Query length the kernels need; inputs are zero-padded up to a multiple of this."""
        if backend == "gpu":
            return math.lcm(128, self.block_q_dkv)
        return math.lcm(self.block_q, self.block_q_dkv, self.block_q_dq)

    def kv_multiple(self, backend: str) -> int:
        """Key length the kernels need; inputs are zero-padded (and masked) up to a multiple of this."""
        if backend == "gpu":
            return math.lcm(128, self.block_kv, self.block_kv_dq)
        return math.lcm(self.block_kv, self.block_kv_dkv, self.block_kv_dq)


def default_block_sizes(backend: str, d_qk: int, d_v: int) -> BlockSizes:
    """Tuned defaults per backend and head dims."""
    if backend == "gpu":
        if d_qk + d_v > 256:   # MLA (192/128): keep the K/V ring inside 227 KB of shared memory
            return BlockSizes(block_kv=64, block_q_dkv=64, block_kv_dq=64, num_stages=2)
        return BlockSizes(block_kv=128, block_q_dkv=64, block_kv_dq=64, num_stages=2)
    return BlockSizes()
