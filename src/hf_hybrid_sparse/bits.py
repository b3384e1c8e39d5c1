"""Bit packing shared by the checkpoint format and the kernel format (LSB first everywhere).

* 1 bit per entry (keep-masks): 8 entries per byte, the first entry in the least significant bit.
* 2 bits per entry (tier codes, N:M positions): 4 entries per byte, the first in the lowest two bits.

Both pack along the last dimension, padding it with zeros to a whole byte. NumPy's ``packbits`` does
the 1-bit work (tens of times faster than tensor arithmetic on large masks).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> 1-D ``uint8``: the row-major flattened mask, 8 entries per byte, LSB first."""
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.bool).numpy()
    return torch.from_numpy(np.packbits(flat, bitorder="little"))


def check_packed(packed: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless ``packed`` is what :func:`pack_bits` makes of a mask of ``shape``."""
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 7) // 8:
        raise ValueError(
            f"packed mask has dtype {packed.dtype} and {packed.numel()} bytes; expected uint8 with "
            f"{(n + 7) // 8} bytes for shape {list(shape)}"
        )


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the bool tensor of ``shape`` (raises ``ValueError`` on a size mismatch)."""
    check_packed(packed, shape)
    n = math.prod(shape)
    bits = np.unpackbits(packed.contiguous().numpy(), count=n, bitorder="little")
    return torch.from_numpy(bits.view(np.bool_)).reshape(shape)


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Codes in 0..3 ``[..., n]`` -> ``uint8 [..., ceil(n/4)]``, 4 codes per byte, the first lowest."""
    c = codes.to(torch.uint8)
    pad = (-c.shape[-1]) % 4
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    q = c.reshape(*c.shape[:-1], c.shape[-1] // 4, 4)  # explicit sizes: the tensor may be empty
    return q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)


#: the four 2-bit codes of every byte value, the first lowest: unpacking is one table lookup
_CODES_OF_BYTE = torch.tensor(
    [[(b >> s) & 3 for s in (0, 2, 4, 6)] for b in range(256)], dtype=torch.uint8, device="cpu"
)


def unpack_2bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_2bit`: ``uint8 [..., n]`` codes from ``[..., ceil(n/4)]`` bytes."""
    b = packed.to(torch.uint8)
    codes = _CODES_OF_BYTE.to(b.device)[b.long()]
    return codes.reshape(*b.shape[:-1], -1)[..., :n]


def unpack_2bit_bytes(raw: bytes, n: int) -> np.ndarray:
    """:func:`unpack_2bit` of host bytes, in NumPy (same table): ``uint8 [n]`` codes.

    For header parsing, which runs inside from_pretrained's meta-device context, where every torch op
    pays the context's dispatch (~15 us; 210 tier maps cost ~40 ms through torch, ~3 ms here)."""
    return _CODES_OF_BYTE.numpy()[np.frombuffer(raw, dtype=np.uint8)].reshape(-1)[:n]
