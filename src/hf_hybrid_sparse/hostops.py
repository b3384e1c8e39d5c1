"""Element selection and zero tests of host tensors through NumPy.

Saving and loading move every pruned weight through a boolean mask. torch's boolean indexing and its
bool-tensor arithmetic take 3-6x NumPy's time on this work (``np.compress`` / a fancy-index store over
the kept positions; one IEEE compare), so tensors on the CPU go through NumPy views. NumPy has no
bfloat16: 16-bit floats are moved as their raw ``int16`` bits, which selection does not look at.
Tensors on other devices use the torch ops.
"""

from __future__ import annotations

import numpy as np
import torch

_RAW = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
# scatter finds positions a chunk at a time: its index array (8 bytes per kept entry) stays small and is
# reused from the heap instead of megabytes of fresh pages per weight (first touches of memory dominate
# here); loading a compressed SmolLM2 measured 1.0-1.7 s chunked against 1.8-2.0 s in one piece
_CHUNK = 1 << 16


def _host_raw(t: torch.Tensor) -> np.ndarray | None:
    """A flat NumPy view of a contiguous CPU tensor's elements as raw integers (``None`` where impossible)."""
    if t.device.type != "cpu" or t.is_complex() or t.element_size() not in _RAW:
        return None
    return t.detach().contiguous().reshape(-1).view(torch.int8).numpy().view(_RAW[t.element_size()])


def popcount(packed: np.ndarray) -> np.ndarray:
    """Set bits of each element of an unsigned integer array (``numpy.bitwise_count`` where NumPy has it)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(packed)
    per_byte = np.unpackbits(packed.view(np.uint8)[..., None], axis=-1).sum(-1, dtype=np.uint8)
    return per_byte.reshape(*packed.shape, packed.itemsize).sum(-1, dtype=np.uint8)


def _host_bool(mask: torch.Tensor) -> np.ndarray:
    return mask.detach().reshape(-1).to(device="cpu", dtype=torch.bool).numpy()


def select(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``values[keep]``: the 1-D entries where ``keep`` (same shape) is True, in row-major order."""
    if values.shape != keep.shape:
        raise ValueError(f"select: values {list(values.shape)} and keep {list(keep.shape)} differ in shape")
    raw = _host_raw(values)
    if raw is None:
        return torch.masked_select(values, keep.to(values.device))
    return torch.from_numpy(np.compress(_host_bool(keep), raw)).view(values.dtype)


def scatter(values: torch.Tensor, keep: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
    """Inverse of :func:`select`: a tensor shaped like ``keep`` holding ``values`` (1-D, one per True entry,
    row-major) where ``keep`` is True and ``fill`` elsewhere, with ``values``' dtype and device."""
    if values.dim() != 1:
        raise ValueError(f"scatter: values must be 1-D, got shape {list(values.shape)}")
    raw = _host_raw(values)
    if raw is None:  # not on the CPU: torch's op
        keep = keep.to(values.device)
        count = int(torch.count_nonzero(keep))
    else:
        flags = _host_bool(keep)
        count = int(np.count_nonzero(flags))
    if values.numel() != count:  # before the output is allocated
        raise ValueError(f"scatter: {values.numel()} values for {count} kept entries")
    out = torch.full(keep.shape, fill, dtype=values.dtype, device=values.device)
    if raw is None:
        return out.masked_scatter_(keep, values)
    dest = _host_raw(out)  # a view of out's storage: the stores land in out
    taken = 0
    for start in range(0, flags.size, _CHUNK):
        where = np.flatnonzero(flags[start : start + _CHUNK])
        dest[start : start + _CHUNK][where] = raw[taken : taken + where.size]
        taken += where.size
    return out


def nonzero_bits(weight: torch.Tensor) -> np.ndarray:
    """Packed bits (row-major, 8 per byte, LSB first) of ``weight != 0``: -0.0 counts as zero, NaN as nonzero."""
    w = weight.detach().cpu().contiguous().reshape(-1)
    if w.dtype == torch.bfloat16:  # NumPy has no bfloat16: test the raw bits without the sign
        nonzero = (w.view(torch.int16).numpy() & 0x7FFF) != 0
    elif w.dtype in (torch.float32, torch.float16, torch.float64):
        nonzero = w.numpy() != 0  # IEEE compare, one pass, no integer temporary
    else:
        nonzero = (w != 0).numpy()
    return np.packbits(nonzero, bitorder="little")


def count_true(mask: torch.Tensor) -> int:
    """``int(mask.sum())`` of a bool tensor, without torch's bool reduction on the CPU."""
    if mask.device.type != "cpu":
        return int(torch.count_nonzero(mask))
    return int(np.count_nonzero(_host_bool(mask)))


def count_outside(weight: torch.Tensor, keep: torch.Tensor, keep_bits: np.ndarray | None = None) -> int:
    """How many entries of ``weight`` are nonzero where ``keep`` (same shape) is False.

    ``keep_bits`` is ``keep`` packed as :func:`nonzero_bits` packs, when the caller has it already.
    """
    if weight.device.type != "cpu":
        return int(torch.count_nonzero((weight.detach() != 0) & ~keep.to(weight.device)))
    if keep_bits is None:
        keep_bits = np.packbits(_host_bool(keep), bitorder="little")
    return int(popcount(nonzero_bits(weight) & ~keep_bits).sum(dtype=np.int64))
