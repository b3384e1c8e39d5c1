"""Sparsity patterns: masks from scores for unstructured, N:M and hybrid three-tier sparsity.

Conventions, shared by every part of the package:

* A score matrix ``S`` and a mask have the logical weight shape ``[out_features, in_features]``.
  Masks are ``torch.bool`` with ``True`` = kept.
* N:M counts *kept* weights (the NVIDIA convention): ``2:4`` keeps 2 of every 4 consecutive
  input columns of each row.
* Tier codes (format version 1) are ordered from dense to sparse, so "never move to a denser
  tier" means ``new_code >= old_code``: ``DENSE = 0``, ``NM = 1``, ``TOPK = 2``.
* Rounding rule for tier counts: with ``B`` blocks in a group and ratios ``(d, n, t)``,
  ``n_dense = floor(d*B + 1/2)``, ``n_dense + n_nm = floor((d+n)*B + 1/2)`` and TOPK takes the rest
  (cumulative round-half-up, so the three counts always add up to ``B``).
* Unstructured sparsity ``s`` prunes exactly ``floor(s * in_features)`` weights per row
  (``comparison_group="row"``) or ``floor(s * numel)`` per layer (``"layer"``), as Wanda does.
* Ties are broken by position (the earlier index ranks higher), so masks are deterministic.
"""

from __future__ import annotations

import math

import torch

from ..errors import ModelStructureError, TierMapError

DENSE, NM, TOPK = 0, 1, 2
TIER_NAMES = {DENSE: "dense", NM: "nm", TOPK: "topk"}
TIER_FORMAT_VERSION = 1


def tier_counts(n_blocks: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """Blocks per tier for a group of ``n_blocks`` (cumulative round-half-up, see module doc)."""
    eps = 1e-9  # 0.35 * 20 is 7.000000000000001 in binary; keep exact halves and integers stable
    first = min(n_blocks, math.floor(ratios[0] * n_blocks + 0.5 + eps))
    second = min(n_blocks, max(first, math.floor((ratios[0] + ratios[1]) * n_blocks + 0.5 + eps)))
    return first, second - first, n_blocks - second


def _sorted_keep(scores: torch.Tensor, k_keep: int) -> torch.Tensor:
    """Boolean mask keeping the ``k_keep`` highest entries of each row (stable: earlier index wins ties)."""
    n = scores.shape[-1]
    if k_keep <= 0 or n == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k_keep >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    # the k-th highest value is the threshold; ties at it go to the earliest indices, as a stable sort
    # would give them (2-4x faster than sorting every row)
    threshold = torch.topk(scores, k_keep, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    keep = scores > threshold
    ties = scores == threshold
    need = k_keep - keep.sum(-1, keepdim=True)
    return keep | (ties & (ties.cumsum(-1) <= need))


def unstructured_mask(scores: torch.Tensor, sparsity: float, group: str = "row") -> torch.Tensor:
    """Keep-mask pruning the lowest-scoring ``sparsity`` fraction per row or per layer."""
    rows, cols = scores.shape
    if group == "row":
        n_prune = int(cols * sparsity)
        return _sorted_keep(scores, cols - n_prune)
    n_prune = int(rows * cols * sparsity)
    return _sorted_keep(scores.reshape(1, -1), rows * cols - n_prune).reshape(rows, cols)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the ``n`` highest of every ``m`` consecutive input columns in each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ModelStructureError(f"in_features={cols} is not divisible by M={m}.")
    return _sorted_keep(scores.reshape(rows, cols // m, m), n).reshape(rows, cols)


def to_blocks(t: torch.Tensor, bs: int) -> torch.Tensor:
    """View ``[R*bs, C*bs]`` as ``[R, C, bs, bs]`` (a copy)."""
    rows, cols = t.shape
    return t.reshape(rows // bs, bs, cols // bs, bs).permute(0, 2, 1, 3).contiguous()


def from_blocks(t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_blocks`."""
    r, c, bs, _ = t.shape
    return t.permute(0, 2, 1, 3).reshape(r * bs, c * bs)


def block_scores(scores: torch.Tensor, bs: int) -> torch.Tensor:
    """Sum of the weight scores of each ``bs x bs`` block: ``[out/bs, in/bs]``."""
    rows, cols = scores.shape
    return scores.reshape(rows // bs, bs, cols // bs, bs).sum(dim=(1, 3))


def check_tileable(shape: tuple[int, int], bs: int, m: int) -> str | None:
    """Return why ``shape`` cannot take the hybrid pattern, or ``None`` if it can."""
    rows, cols = shape
    if rows % bs or cols % bs:
        return f"shape {rows}x{cols} is not divisible into {bs}x{bs} blocks"
    if bs % m:
        return f"block size {bs} is not a multiple of M={m}"
    return None


def assign_tiers(
    blk_scores: torch.Tensor,
    ratios: tuple[float, float, float],
    group: str = "layer",
    previous: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tier map (int8 ``[R, C]``) ranking blocks by score within the layer or each block-row.

    With a ``previous`` tier map, blocks only move to sparser tiers: DENSE is chosen among the
    previous DENSE blocks, NM among the remaining previous DENSE/NM blocks, the rest is TOPK;
    within each choice the highest-scoring eligible blocks win (so the blocks that move are the
    lowest-scoring ones of their current tier).
    """
    r, c = blk_scores.shape
    keys = blk_scores.reshape(1, -1) if group == "layer" else blk_scores
    prev = None
    if previous is not None:
        previous = previous.to(device=blk_scores.device)
        if tuple(previous.shape) != (r, c):
            raise TierMapError(
                f"previous tier map has shape {tuple(previous.shape)}, the layer needs {(r, c)}."
            )
        if previous.numel() and (previous.min() < DENSE or previous.max() > TOPK):
            raise TierMapError(f"previous tier map holds codes outside {DENSE}..{TOPK}.")
        prev = previous.reshape(keys.shape).long()
    n_dense, n_nm, _ = tier_counts(keys.shape[1], ratios)
    if prev is not None:
        have_dense = (prev == DENSE).sum(dim=1)
        have_le_nm = (prev <= NM).sum(dim=1)
        if (have_dense < n_dense).any() or (have_le_nm < n_dense + n_nm).any():
            raise TierMapError(
                f"target tiers need {n_dense} DENSE and {n_dense + n_nm} DENSE-or-NM blocks per "
                f"{group}, but the previous tier map has only {int(have_dense.min())} and "
                f"{int(have_le_nm.min())}: blocks would move to a denser tier."
            )
    floor = torch.finfo(torch.float64).min
    keys = keys.double()
    tiers = torch.full(keys.shape, TOPK, dtype=torch.int8, device=keys.device)
    eligible_dense = torch.ones_like(keys, dtype=torch.bool) if prev is None else prev == DENSE
    dense = _sorted_keep(torch.where(eligible_dense, keys, floor), n_dense) & eligible_dense
    eligible_nm = (~dense) if prev is None else ((prev <= NM) & ~dense)
    nm = _sorted_keep(torch.where(eligible_nm, keys, floor), n_nm) & eligible_nm
    tiers[nm] = NM
    tiers[dense] = DENSE
    return tiers.reshape(r, c)


def topk_block_mask(scores: torch.Tensor, bs: int, k: int) -> torch.Tensor:
    """Keep-mask with the ``k`` highest scores inside every ``bs x bs`` block."""
    blocks = to_blocks(scores, bs)
    r, c = blocks.shape[:2]
    keep = _sorted_keep(blocks.reshape(r, c, bs * bs), k).reshape(r, c, bs, bs)
    return from_blocks(keep)


def expand_tiers(tier_map: torch.Tensor, bs: int) -> torch.Tensor:
    """Per-weight tier codes ``[R*bs, C*bs]`` from a block tier map."""
    return tier_map.repeat_interleave(bs, dim=0).repeat_interleave(bs, dim=1)


def hybrid_mask(
    scores: torch.Tensor, tier_map: torch.Tensor, bs: int, n: int, m: int, k: int
) -> torch.Tensor:
    """Keep-mask obeying ``tier_map``: DENSE blocks whole, NM blocks N:M by row, TOPK blocks top-k."""
    per_weight = expand_tiers(tier_map.to(scores.device), bs)
    mask = torch.ones_like(scores, dtype=torch.bool)
    is_nm = per_weight == NM
    is_topk = per_weight == TOPK
    if is_nm.any():
        mask = torch.where(is_nm, nm_mask(scores, n, m), mask)
    if is_topk.any():
        mask = torch.where(is_topk, topk_block_mask(scores, bs, k), mask)
    return mask


def check_hybrid(mask: torch.Tensor, tier_map: torch.Tensor, bs: int, n: int, m: int, k: int) -> list[str]:
    """List every way ``mask`` violates ``tier_map`` (empty when it obeys it); used by tests and loaders."""
    problems = []
    blocks = to_blocks(mask, bs)
    kept = blocks.sum(dim=(2, 3))
    tm = tier_map.to(mask.device)
    if ((tm == DENSE) & (kept != bs * bs)).any():
        problems.append("a DENSE block has pruned weights")
    if ((tm == TOPK) & (kept > k)).any():
        problems.append(f"a TOPK block keeps more than {k} weights")
    groups = blocks.reshape(*blocks.shape[:3], bs // m, m).sum(-1)
    if ((tm == NM)[..., None, None] & (groups > n)).any():
        problems.append(f"an NM block has more than {n} of {m} kept")
    return problems
