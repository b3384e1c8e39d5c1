"""Triton kernels for the packed hybrid format (CUDA; checkable on CPU with ``TRITON_INTERPRET=1``).

Decode (1-16 tokens) is memory-bound: one program per 16-row block-row reads each packed byte of
its row once -- DENSE blocks as 16x16 tiles, NM blocks as 16x8 values plus 2-bit positions (the
inputs are gathered), TOPK blocks as K values plus positions (scattered into the 16 outputs) -- and
accumulates in fp32. Prefill (more tokens) is compute-bound: it runs the dense GEMM (cuBLAS tensor
cores) on the unpacked weight.

Speed on a GPU has not been measured in this repository yet (no GPU was available); see
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import functools

import torch

from .packing import BLOCK, PackedHybrid

MAX_DECODE_TOKENS = 16


def triton_available() -> bool:
    """Whether Triton imports (CUDA kernels, or the CPU interpreter with ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _decode_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(
        x_ptr, y_ptr, b_ptr, T, stride_x, stride_y,
        d_vals, d_ptr, d_cols,
        n_vals, n_idx, n_ptr, n_cols,
        t_vals, t_pos, t_ptr, t_cols,
        HAS_BIAS: tl.constexpr, HAS_TOPK: tl.constexpr, BT: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    ):  # fmt: skip
        r = tl.program_id(0)
        offs_t = tl.arange(0, BT)
        tmask = offs_t < T
        i16 = tl.arange(0, 16)
        i8 = tl.arange(0, 8)
        acc = tl.zeros((BT, 16), dtype=tl.float32)  # [tokens, the 16 outputs of this block-row]

        start = tl.load(d_ptr + r)
        end = tl.load(d_ptr + r + 1)
        for b in range(start, end):
            c = tl.load(d_cols + b)
            w = tl.load(d_vals + b * 256 + i16[:, None] * 16 + i16[None, :]).to(tl.float32)
            xb = tl.load(
                x_ptr + offs_t[:, None] * stride_x + c * 16 + i16[None, :], mask=tmask[:, None], other=0.0
            )
            acc += tl.sum(xb.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)

        start = tl.load(n_ptr + r)
        end = tl.load(n_ptr + r + 1)
        for b in range(start, end):
            c = tl.load(n_cols + b)
            v = tl.load(n_vals + b * 128 + i16[:, None] * 8 + i8[None, :]).to(tl.float32)  # [16 rows, 8 kept]
            byte = tl.load(n_idx + b * 32 + i16[:, None] * 2 + i8[None, :] // 4).to(tl.int32)
            pos = (byte >> ((i8[None, :] % 4) * 2)) & 3
            col = (i8[None, :] // 2) * 4 + pos  # column inside the block
            xg = tl.load(
                x_ptr + offs_t[:, None, None] * stride_x + c * 16 + col[None, :, :],
                mask=tmask[:, None, None],
                other=0.0,
            )  # [T, 16, 8]
            acc += tl.sum(xg.to(tl.float32) * v[None, :, :], axis=2)

        if HAS_TOPK:  # topk_per_block=0: TOPK blocks hold nothing, and their value arrays are empty
            start = tl.load(t_ptr + r)
            end = tl.load(t_ptr + r + 1)
            ik = tl.arange(0, KP)
            kmask = ik < K
            for b in range(start, end):
                c = tl.load(t_cols + b)
                v = tl.load(t_vals + b * K + ik, mask=kmask, other=0.0).to(tl.float32)
                p = tl.load(t_pos + b * K + ik, mask=kmask, other=0).to(tl.int32)
                xg = tl.load(
                    x_ptr + offs_t[:, None] * stride_x + c * 16 + (p % 16)[None, :],
                    mask=tmask[:, None] & kmask[None, :],
                    other=0.0,
                )  # [T, KP]
                contrib = xg.to(tl.float32) * v[None, :]
                onehot = ((p // 16)[:, None] == i16[None, :]).to(tl.float32)  # [KP, 16]
                acc += tl.sum(contrib[:, :, None] * onehot[None, :, :], axis=1)

        if HAS_BIAS:
            acc += tl.load(b_ptr + r * 16 + i16).to(tl.float32)[None, :]
        tl.store(
            y_ptr + offs_t[:, None] * stride_y + r * 16 + i16[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=tmask[:, None],
        )

    return kernel


def decode(
    x: torch.Tensor, packed: PackedHybrid, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for ``x`` of shape ``[T, in]`` with ``T <= 16``, from the packed weight."""
    T = x.shape[0]
    if T > MAX_DECODE_TOKENS:
        raise ValueError(f"decode handles up to {MAX_DECODE_TOKENS} tokens, got {T}.")
    x = x.contiguous()
    y = out if out is not None else torch.empty(T, packed.out_features, dtype=x.dtype, device=x.device)
    t = packed.tensors
    kp = 1 << max(packed.topk - 1, 0).bit_length() if packed.topk > 0 else 1
    grid = (packed.out_features // BLOCK,)
    _decode_kernel()[grid](
        x, y, bias if bias is not None else x, T, x.stride(0), y.stride(0),
        t["dense_vals"], t["dense_row_ptr"], t["dense_cols"],
        t["nm_vals"], t["nm_idx"], t["nm_row_ptr"], t["nm_cols"],
        t["topk_vals"], t["topk_pos"], t["topk_row_ptr"], t["topk_cols"],
        HAS_BIAS=bias is not None, HAS_TOPK=packed.topk > 0, BT=16, K=max(packed.topk, 1), KP=max(kp, 16),
    )  # fmt: skip
    return y
