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

Two tier rules (``HybridSparseConfig.tier_rule``): ``"score"`` ranks blocks by their summed score
(DENSE to the highest); ``"loss"`` (the default) gives each block the cost of each tier, the score
mass that tier would remove from *that* block (:func:`tier_costs`), and chooses the assignment with
the smallest total cost under the tier counts, exactly (:func:`assign_tiers_min_loss`).
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


def checked_previous(previous: torch.Tensor | None, shape: tuple[int, int], device) -> torch.Tensor | None:
    if previous is None:
        return None
    previous = previous.to(device=device)
    if tuple(previous.shape) != tuple(shape):
        raise TierMapError(
            f"previous tier map has shape {tuple(previous.shape)}, the layer needs {tuple(shape)}."
        )
    if previous.numel() and (previous.min() < DENSE or previous.max() > TOPK):
        raise TierMapError(f"previous tier map holds codes outside {DENSE}..{TOPK}.")
    return previous.long()


def _spread(total: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor | None:
    """Integers ``lo <= x <= hi`` summing to ``total``, as even as the bounds allow (``None``: impossible)."""
    if int(lo.sum()) > total or int(hi.sum()) < total:
        return None
    x = lo.clone()
    # raise the lowest entries one level at a time: water-filling on integers, earliest rows first
    while int(x.sum()) < total:
        room = x < hi
        level = int(x[room].min())
        at = torch.nonzero(room & (x == level)).flatten()
        at = at[: total - int(x.sum())]
        x[at] += 1
    return x


def group_counts(
    shape: tuple[int, int],
    ratios: tuple[float, float, float],
    group: str = "layer",
    previous: torch.Tensor | None = None,
    layer_counts: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Blocks per tier for each comparison group of a ``[R, C]`` tier map: ``[G, 3]`` (G = 1 or R).

    Without ``layer_counts`` every group rounds ``ratios`` (see the module doc). With them (a layer-wise
    allocation, exact counts for the whole layer), a ``"row"`` grouping spreads them over the block-rows as
    evenly as the previous tier map allows. Raises :class:`TierMapError` if a group would need a block to
    move to a denser tier than ``previous`` gives it.
    """
    r, c = shape
    g, per = (1, r * c) if group == "layer" else (r, c)
    prev = None if previous is None else previous.reshape(g, per).long()
    if layer_counts is None or group == "layer":
        one = tier_counts(per, ratios) if layer_counts is None else tuple(int(v) for v in layer_counts)
        if sum(one) != per or min(one) < 0:
            raise TierMapError(f"tier counts {one} do not cover the {per} blocks of a {group}.")
        counts = torch.tensor([one] * g, dtype=torch.long)
    else:
        n_dense, n_nm, n_topk = (int(v) for v in layer_counts)
        if n_dense + n_nm + n_topk != r * c or min(n_dense, n_nm, n_topk) < 0:
            raise TierMapError(
                f"tier counts {tuple(layer_counts)} do not cover the {r * c} blocks of the layer."
            )
        full = torch.full((g,), per, dtype=torch.long)
        cap_dense = full if prev is None else (prev == DENSE).sum(1).cpu()
        cap_le_nm = full if prev is None else (prev <= NM).sum(1).cpu()
        dense = _spread(n_dense, torch.zeros_like(full), cap_dense)
        topk = None if dense is None else _spread(n_topk, full - cap_le_nm, full - dense)
        if topk is None:
            raise TierMapError(
                f"the layer's allocation ({n_dense} DENSE, {n_nm} NM, {n_topk} TOPK blocks) cannot be spread "
                "over its block-rows without moving a block to a denser tier than the previous tier map."
            )
        counts = torch.stack([dense, full - dense - topk, topk], dim=1)
    if prev is not None:
        have_dense = (prev == DENSE).sum(dim=1).cpu()
        have_le_nm = (prev <= NM).sum(dim=1).cpu()
        need_dense, need_le_nm = counts[:, 0], counts[:, 0] + counts[:, 1]
        if (have_dense < need_dense).any() or (have_le_nm < need_le_nm).any():
            worst = int(
                torch.argmax((need_dense - have_dense).clamp_min(0) + (need_le_nm - have_le_nm).clamp_min(0))
            )
            raise TierMapError(
                f"target tiers need {int(need_dense[worst])} DENSE and {int(need_le_nm[worst])} DENSE-or-NM "
                f"blocks per {group}, but the previous tier map has only {int(have_dense[worst])} and "
                f"{int(have_le_nm[worst])}: blocks would move to a denser tier."
            )
    return counts


def _keep_counts(keys: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the ``k[g]`` highest entries of each row ``g`` of ``keys`` (earlier index wins ties)."""
    order = torch.sort(-keys, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(keys.shape[1], device=keys.device).expand_as(order))
    return ranks < k.to(keys.device).unsqueeze(1)


def assign_tiers(
    blk_scores: torch.Tensor,
    ratios: tuple[float, float, float],
    group: str = "layer",
    previous: torch.Tensor | None = None,
    layer_counts: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Tier map (int8 ``[R, C]``) ranking blocks by summed score within the layer or each block-row.

    With a ``previous`` tier map, blocks only move to sparser tiers: DENSE is chosen among the
    previous DENSE blocks, NM among the remaining previous DENSE/NM blocks, the rest is TOPK;
    within each choice the highest-scoring eligible blocks win (so the blocks that move are the
    lowest-scoring ones of their current tier). ``layer_counts``: exact counts for the layer
    (see :func:`group_counts`) instead of ``ratios``.
    """
    r, c = blk_scores.shape
    g = 1 if group == "layer" else r
    previous = checked_previous(previous, (r, c), blk_scores.device)
    counts = group_counts((r, c), ratios, group, previous, layer_counts)
    return _rank_by_keys(blk_scores.double().reshape(g, -1), counts, previous, g).to(torch.int8).reshape(r, c)


def _rank_by_keys(
    keys: torch.Tensor, counts: torch.Tensor, previous: torch.Tensor | None, g: int
) -> torch.Tensor:
    """``[G, B]`` tier codes: per group, DENSE to the highest keys, then NM, the rest TOPK (``previous`` honoured)."""
    prev = None if previous is None else previous.reshape(g, -1)
    floor = torch.finfo(torch.float64).min
    tiers = torch.full(keys.shape, TOPK, dtype=torch.long, device=keys.device)
    eligible_dense = torch.ones_like(keys, dtype=torch.bool) if prev is None else prev == DENSE
    dense = _keep_counts(torch.where(eligible_dense, keys, floor), counts[:, 0]) & eligible_dense
    eligible_nm = (~dense) if prev is None else ((prev <= NM) & ~dense)
    nm = _keep_counts(torch.where(eligible_nm, keys, floor), counts[:, 1]) & eligible_nm
    tiers[nm] = NM
    tiers[dense] = DENSE
    return tiers


def tier_costs(scores: torch.Tensor, bs: int, n: int, m: int, k: int) -> torch.Tensor:
    """Score mass each tier would remove from each block: ``[R, C, 3]`` fp64 (DENSE, NM, TOPK).

    ``scores`` are non-negative per-weight costs of pruning (``[out, in]``); DENSE removes nothing,
    NM the ``m - n`` lowest of every ``m`` inputs of each row, TOPK all but the ``k`` highest.
    """
    blocks = to_blocks(scores.float(), bs)
    r, c = blocks.shape[:2]
    total = blocks.sum(dim=(2, 3), dtype=torch.float64)
    flat = blocks.reshape(r, c, bs * bs)
    topk_kept = flat.topk(k, dim=-1).values.sum(-1, dtype=torch.float64) if k else torch.zeros_like(total)
    groups = blocks.reshape(r, c, bs, bs // m, m)
    nm_kept = groups.topk(n, dim=-1).values.sum(dim=(-1, -2, -3), dtype=torch.float64)
    zero = torch.zeros_like(total)
    return torch.stack([zero, (total - nm_kept).clamp_min(0), (total - topk_kept).clamp_min(0)], dim=-1)


def hybrid_tiers(
    scores: torch.Tensor,
    ratios: tuple[float, float, float],
    group: str,
    previous: torch.Tensor | None,
    *,
    bs: int,
    n: int,
    m: int,
    k: int,
    rule: str = "loss",
    layer_counts: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Tier map for per-weight pruning costs ``scores`` (``[out, in]``, negatives count as 0) by ``rule``."""
    scores = scores.clamp_min(0)
    if rule == "score":
        return assign_tiers(block_scores(scores, bs), ratios, group, previous, layer_counts)
    return assign_tiers_min_loss(tier_costs(scores, bs, n, m, k), ratios, group, previous, layer_counts)


def _split_two(cost, tiers, x: int, y: int, n_y: torch.Tensor, forbid: float) -> torch.Tensor:
    """Best split of the blocks now in tiers ``x`` or ``y`` (per group): ``y`` takes the ``n_y`` blocks
    with the smallest ``cost_y - cost_x`` (exact for two tiers)."""
    pool = (tiers == x) | (tiers == y)
    gain = torch.where(pool, cost[..., x] - cost[..., y], torch.full_like(cost[..., 0], -forbid * 4))
    to_y = _keep_counts(gain, n_y) & pool
    return torch.where(pool, torch.where(to_y, y, x), tiers)


def assign_tiers_min_loss(
    costs: torch.Tensor,
    ratios: tuple[float, float, float],
    group: str = "layer",
    previous: torch.Tensor | None = None,
    layer_counts: tuple[int, int, int] | None = None,
    max_rounds: int = 100_000,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tier map (int8 ``[R, C]``) with the smallest total cost under the tier counts of each group.

    ``costs`` is :func:`tier_costs`' ``[R, C, 3]``. A transportation problem with three tiers: started from
    alternating exact two-tier splits, it cancels improving exchanges (two blocks swapping tiers, or three
    rotating) until none is left, which for three tiers is the optimality condition (no negative cycle
    through the tier nodes). A ``previous`` tier map forbids moves to denser tiers. ``counts`` (``[G, 3]``)
    gives each group's tier counts directly (they must be feasible with ``previous``).
    """
    r, c = costs.shape[:2]
    previous = checked_previous(previous, (r, c), costs.device)
    if counts is None:
        counts = group_counts((r, c), ratios, group, previous, layer_counts)
    counts = counts.to(costs.device)
    g = 1 if group == "layer" else r
    cost = costs.reshape(g, -1, 3).double().clone()
    scale = float(cost.abs().max()) if cost.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    cost = cost / scale
    forbid = 1e6 * cost.shape[1] + 1.0  # larger than any sum of real (normalised) costs
    if previous is not None:
        prev = previous.reshape(g, -1)
        cost[..., DENSE] += (prev > DENSE) * forbid
        cost[..., NM] += (prev > NM) * forbid
    # a feasible start: the summed-score rule on "what TOPK would cost" (it honours `previous`)
    tiers = _rank_by_keys(costs[..., TOPK].double().reshape(g, -1), counts, previous, g)
    for _ in range(8):  # coordinate descent over the three pairs of tiers
        before = tiers
        tiers = _split_two(cost, tiers, NM, TOPK, counts[:, TOPK], forbid)
        tiers = _split_two(cost, tiers, DENSE, NM, counts[:, NM], forbid)
        tiers = _split_two(cost, tiers, DENSE, TOPK, counts[:, TOPK], forbid)
        if torch.equal(before, tiers):
            break
    tol = 1e-12 * cost.shape[1]
    rows = torch.arange(g, device=cost.device)
    for _ in range(max_rounds):
        cur = cost.gather(2, tiers.unsqueeze(-1)).squeeze(-1)
        # move[x][y]: cheapest single block now in x moved to y (value, index), per group
        move = {}
        for x in (DENSE, NM, TOPK):
            for y in (DENSE, NM, TOPK):
                if x != y:
                    delta = torch.where(tiers == x, cost[..., y] - cur, torch.full_like(cur, float("inf")))
                    move[x, y] = delta.min(dim=1)
        cycles = [
            ((DENSE, NM), (NM, DENSE)),
            ((DENSE, TOPK), (TOPK, DENSE)),
            ((NM, TOPK), (TOPK, NM)),
            ((DENSE, NM), (NM, TOPK), (TOPK, DENSE)),
            ((DENSE, TOPK), (TOPK, NM), (NM, DENSE)),
        ]
        gains = torch.stack([sum(move[e].values for e in cyc) for cyc in cycles], dim=1)
        best, which = gains.min(dim=1)
        todo = best < -tol
        if not bool(todo.any()):
            break
        new = tiers.clone()
        for ci, cyc in enumerate(cycles):
            sel = rows[todo & (which == ci)]
            if sel.numel() == 0:
                continue
            for x, y in cyc:
                new[sel, move[x, y].indices[sel]] = y
        tiers = new
    else:  # pragma: no cover - a strictly improving finite search always ends well before this
        raise TierMapError("tier assignment did not converge")
    return tiers.to(torch.int8).reshape(r, c)


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
