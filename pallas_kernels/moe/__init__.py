"""MoE kernels: router, token permute/combine, grouped matmul (gmm/tgmm) with reference, TPU and GPU backends."""
from pallas_kernels.moe.ops import gmm, tgmm
from pallas_kernels.moe.permute import combine, permute
from pallas_kernels.moe.router import Routing, route
from pallas_kernels.moe.tiling import GmmTilings, Tiling

__all__ = ["gmm", "tgmm", "route", "permute", "combine", "Routing", "Tiling", "GmmTilings"]
