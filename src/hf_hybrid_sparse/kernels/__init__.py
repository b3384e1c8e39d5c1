"""Inference on the packed hybrid format: packing, the ``HybridSparseLinear`` module, Triton (CUDA) kernels."""

from .linear import HybridSparseLinear, convert_to_dense, convert_to_hybrid_kernels
from .packing import PackedHybrid, pack, unpack

__all__ = [
    "HybridSparseLinear",
    "convert_to_dense",
    "convert_to_hybrid_kernels",
    "PackedHybrid",
    "pack",
    "unpack",
]
