"""The packed hybrid format of one linear weight (format version 1) and its exact pack/unpack.

For a logical weight ``[out, in]`` with a tier map ``[out/16, in/16]`` (block size 16, NM tier 2:4):

* DENSE blocks: ``dense_vals [nD, 16, 16]`` -- the block as is (512 B in fp16);
* NM blocks: ``nm_vals [nN, 16, 8]`` -- the 2 kept values of each group of 4, in group order, and
  ``nm_idx [nN, 16, 2]`` uint8 -- their positions in the group, 2 bits each, 4 per byte, least
  significant first (256 + 32 = 288 B); within a group the two positions are ascending (canonical
  order, which the CPU kernel relies on; :func:`canonical_nm` restores it for tensors from elsewhere);
* TOPK blocks: ``topk_vals [nT, K]`` and ``topk_pos [nT, K]`` uint8 -- the in-block position
  ``row * 16 + col`` (2K + K = 45 B for K = 15);
* for each tier a CSR over block-rows: ``<tier>_row_ptr [R + 1]`` int32 and ``<tier>_cols [n]`` int32,
  blocks sorted by (block-row, block-column): a decode kernel walks one block-row per program.

Groups with fewer kept weights than N (or TOPK blocks with fewer than K) are padded with zero values
(at a position the mask prunes), so any mask that obeys its tier map packs exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..bits import pack_2bit, unpack_2bit
from ..errors import PackingError
from ..pruning.patterns import DENSE, NM, TOPK, to_blocks

PACK_FORMAT_VERSION = 1
BLOCK = 16
FIELDS = (
    "dense_vals", "dense_row_ptr", "dense_cols",
    "nm_vals", "nm_idx", "nm_row_ptr", "nm_cols",
    "topk_vals", "topk_pos", "topk_row_ptr", "topk_cols",
)  # fmt: skip


@dataclass
class PackedHybrid:
    """The packed tensors of one weight plus its shape and parameters (see module docstring)."""

    out_features: int
    in_features: int
    topk: int
    tensors: dict[str, torch.Tensor]
    n: int = 2
    m: int = 4
    # for each value slot of nm_vals / topk_vals: whether it holds a kept weight (False: padding); set by pack
    kept: dict[str, torch.Tensor] | None = None

    def nbytes(self) -> int:
        """Bytes of all packed tensors (values, indices and block-column lists)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device=None, dtype=None) -> PackedHybrid:
        """Copy with tensors moved; ``dtype`` applies to the value tensors only."""
        moved = {}
        for k, t in self.tensors.items():
            t = t.to(device) if device is not None else t
            if dtype is not None and k.endswith("_vals"):
                t = t.to(dtype)
            moved[k] = t
        return PackedHybrid(self.out_features, self.in_features, self.topk, moved, self.n, self.m)


def _csr(rows: torch.Tensor, cols: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.bincount(rows, minlength=n_rows)
    ptr = torch.zeros(n_rows + 1, dtype=torch.int32)
    ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return ptr, cols.to(torch.int32)


def pack(
    weight: torch.Tensor, mask: torch.Tensor, tier_map: torch.Tensor, topk: int, nm: tuple[int, int] = (2, 4)
) -> PackedHybrid:
    """Pack a logical ``[out, in]`` weight whose ``mask`` obeys ``tier_map`` (raises :class:`PackingError`)."""
    n, m = nm
    if (n, m) != (2, 4):
        raise PackingError(f"the packed kernels support 2:4 NM blocks, not {n}:{m}.")
    out_f, in_f = weight.shape
    if out_f % BLOCK or in_f % BLOCK:
        raise PackingError(f"a {out_f}x{in_f} weight does not divide into {BLOCK}x{BLOCK} blocks.")
    R, C = out_f // BLOCK, in_f // BLOCK
    if tuple(tier_map.shape) != (R, C):
        raise PackingError(
            f"tier map shape {tuple(tier_map.shape)} does not match the weight's blocks {(R, C)}."
        )
    w = (weight.detach() * mask).cpu()
    wb, mb = to_blocks(w, BLOCK), to_blocks(mask.cpu(), BLOCK)
    tiers = tier_map.cpu()
    tensors: dict[str, torch.Tensor] = {}

    sel = (tiers == DENSE).nonzero()  # row-major: sorted by (row, col)
    tensors["dense_vals"] = wb[sel[:, 0], sel[:, 1]].contiguous()
    tensors["dense_row_ptr"], tensors["dense_cols"] = _csr(sel[:, 0], sel[:, 1], R)

    sel = (tiers == NM).nonzero()
    vals = wb[sel[:, 0], sel[:, 1]].reshape(-1, BLOCK, BLOCK // m, m)
    keep = mb[sel[:, 0], sel[:, 1]].reshape(-1, BLOCK, BLOCK // m, m)
    if (keep.sum(-1) > n).any():
        raise PackingError(f"an NM block keeps more than {n} of {m} weights.")
    # kept positions first (stable), then pruned ones as zero-valued padding; then each group's positions
    # in ascending order (the canonical order: a kernel can expand a row's values in one instruction)
    pos = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :n]
    pos = torch.sort(pos, dim=-1).values
    nm_vals = torch.gather(vals, -1, pos).reshape(-1, BLOCK, BLOCK // m * n)
    kept = {"nm_vals": torch.gather(keep, -1, pos).reshape(nm_vals.shape)}
    tensors["nm_vals"] = nm_vals.contiguous()
    tensors["nm_idx"] = pack_2bit(pos.reshape(-1, BLOCK, BLOCK // m * n)).contiguous()
    tensors["nm_row_ptr"], tensors["nm_cols"] = _csr(sel[:, 0], sel[:, 1], R)

    sel = (tiers == TOPK).nonzero()
    flat_v = wb[sel[:, 0], sel[:, 1]].reshape(-1, BLOCK * BLOCK)
    flat_m = mb[sel[:, 0], sel[:, 1]].reshape(-1, BLOCK * BLOCK)
    if (flat_m.sum(-1) > topk).any():
        raise PackingError(f"a TOPK block keeps more than {topk} weights.")
    tpos = torch.sort((~flat_m).to(torch.int8), dim=-1, stable=True).indices[:, :topk]
    tensors["topk_vals"] = torch.gather(flat_v, 1, tpos).contiguous()
    tensors["topk_pos"] = tpos.to(torch.uint8).contiguous()
    kept["topk_vals"] = torch.gather(flat_m, 1, tpos)
    tensors["topk_row_ptr"], tensors["topk_cols"] = _csr(sel[:, 0], sel[:, 1], R)
    return PackedHybrid(out_f, in_f, topk, tensors, n, m, kept)


def canonical_nm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The NM tensors with each group's two positions ascending (values moved along); others unchanged.

    Raises :class:`PackingError` for a group that names one position twice: the kernels read a group's kept
    pair as one of the 6 pairs of distinct columns.
    """
    idx = unpack_2bit(tensors["nm_idx"], BLOCK // 4 * 2).long()  # [nN, 16, 8]
    pairs = idx.reshape(*idx.shape[:-1], -1, 2)
    if bool((pairs[..., 0] < pairs[..., 1]).all()):
        return tensors
    if bool((pairs[..., 0] == pairs[..., 1]).any()):
        raise PackingError(
            "an NM group of the packed tensors holds the same position twice; pack the weight again with "
            "hf_hybrid_sparse.kernels.packing.pack (each group keeps two distinct positions)."
        )
    order = torch.sort(pairs, dim=-1).indices
    vals = tensors["nm_vals"].reshape(pairs.shape)
    out = dict(tensors)
    out["nm_vals"] = torch.gather(vals, -1, order).reshape(tensors["nm_vals"].shape).contiguous()
    out["nm_idx"] = pack_2bit(torch.gather(pairs, -1, order).reshape(idx.shape)).contiguous()
    return out


def unpack(packed: PackedHybrid) -> torch.Tensor:
    """The dense logical ``[out, in]`` weight (pruned entries zero) -- exact inverse of :func:`pack`."""
    t = packed.tensors
    R, C = packed.out_features // BLOCK, packed.in_features // BLOCK
    dtype = t["dense_vals"].dtype
    device = t["dense_vals"].device
    blocks = torch.zeros(R, C, BLOCK, BLOCK, dtype=dtype, device=device)

    def rows_of(ptr: torch.Tensor) -> torch.Tensor:
        counts = (ptr[1:] - ptr[:-1]).long()
        return torch.repeat_interleave(torch.arange(R, device=device), counts)

    r, c = rows_of(t["dense_row_ptr"]), t["dense_cols"].long()
    blocks[r, c] = t["dense_vals"]

    r, c = rows_of(t["nm_row_ptr"]), t["nm_cols"].long()
    if r.numel():
        idx = unpack_2bit(t["nm_idx"], BLOCK // packed.m * packed.n).long()
        groups = idx.shape[-1] // packed.n
        cols = (
            idx.reshape(-1, BLOCK, groups, packed.n)
            + torch.arange(groups, device=device).reshape(1, 1, -1, 1) * packed.m
        )
        nm_blocks = torch.zeros(r.numel(), BLOCK, BLOCK, dtype=dtype, device=device)
        nm_blocks.scatter_(2, cols.reshape(-1, BLOCK, groups * packed.n), t["nm_vals"])
        blocks[r, c] = nm_blocks

    r, c = rows_of(t["topk_row_ptr"]), t["topk_cols"].long()
    if r.numel():
        tk = torch.zeros(r.numel(), BLOCK * BLOCK, dtype=dtype, device=device)
        tk.scatter_(1, t["topk_pos"].long(), t["topk_vals"])  # positions in a block are distinct
        blocks[r, c] = tk.reshape(-1, BLOCK, BLOCK)
    return blocks.permute(0, 2, 1, 3).reshape(packed.out_features, packed.in_features)


def dense_fp16_bytes(out_features: int, in_features: int) -> int:
    """Bytes of the same weight stored dense in fp16 (the baseline of the size target)."""
    return out_features * in_features * 2
