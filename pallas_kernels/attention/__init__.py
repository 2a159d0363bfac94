"""Flash attention with soft-cap, segment ids and returned max logits: reference, TPU (Mosaic), GPU (Mosaic GPU)."""
from pallas_kernels.attention.block_sizes import BlockSizes
from pallas_kernels.attention.ops import flash_attention

__all__ = ["BlockSizes", "flash_attention"]
