"""The CPU kernel of the packed format: ``torch.ops.hf_hybrid_sparse.hybrid_linear`` / ``hybrid_unpack``.

The C++ lives in ``csrc/hybrid_cpu.cpp``; :mod:`hf_hybrid_sparse.native` builds and loads it on first use
(about a minute, cached per CPU type). The kernel reads each packed byte once for 1-16 tokens; for more
(prefill) it runs a block-sparse GEMM that skips the TOPK blocks' dense work (fp32 and bf16 with AVX-512, on
layers of at least 512 outputs) or feeds unpacked panels of at least 1024 rows (a reused buffer) to the BLAS.
"""

from __future__ import annotations

import torch

from ..native import ARCH_ENV, ENV, available

__all__ = ["ARCH_ENV", "ENV", "available", "linear", "unpack"]


def linear(
    x: torch.Tensor, tensors: list[torch.Tensor], bias: torch.Tensor | None, out_features: int, topk: int
):
    """``x [N, in] @ W.T + bias`` from the packed ``tensors`` (FIELDS order) with the CPU kernel."""
    return torch.ops.hf_hybrid_sparse.hybrid_linear(x, tensors, bias, out_features, topk)


def unpack(tensors: list[torch.Tensor], out_features: int, in_features: int, topk: int) -> torch.Tensor:
    """The dense logical weight from the packed ``tensors`` with the CPU kernel."""
    return torch.ops.hf_hybrid_sparse.hybrid_unpack(tensors, out_features, in_features, topk)
