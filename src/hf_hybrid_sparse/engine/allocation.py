"""Non-uniform allocation of the sparsity budget across layers (OWL, Yin et al. 2024).

Before pruning, one pass over the *dense* model measures each decoder block's outlier ratio: the share
of its Wanda scores ``|W_ij| ||X_j||`` (``|W|`` for magnitude) above ``owl_threshold`` times their mean,
over all the block's target layers together. Blocks with more outliers keep more weights: block ``b``
gets the density shift ``a_b = 2 lambda (r_b - min r) / (max r - min r)``, centred so that the
parameter-weighted mean shift is zero, i.e. the model-wide budget is unchanged.

* ``unstructured``: block ``b``'s layers are pruned to ``sparsity - a_b`` (rounded to whole weights per
  comparison group, to nearest).
* ``hybrid``: the shift moves blocks between DENSE and TOPK (NM shares stay as asked): a layer of ``B``
  blocks gets ``round(a_b B / (1 - k / bs^2))`` more DENSE and as many fewer TOPK blocks. The integer
  shifts are then balanced so the model-wide DENSE, NM and TOPK counts equal those of the uniform
  allocation exactly; a layer's shift is clamped to what it can take (no negative count, and with a
  previous tier map no block moving to a denser tier), the rest is given to other layers, and a budget
  no layer can absorb raises :class:`~hf_hybrid_sparse.errors.TierMapError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import HybridSparseConfig
from ..errors import TierMapError
from ..pruning.patterns import DENSE, NM, group_counts
from ..pruning.scoring import magnitude_scores, wanda_scores
from .discovery import Target
from .planning import Plan, matrices


@dataclass
class Allocation:
    """Per-layer targets of a non-uniform allocation, and what they were derived from."""

    outlier_ratios: list[float | None] = field(default_factory=list)  # per decoder block
    density_shifts: list[float] = field(default_factory=list)  # per decoder block, before rounding
    counts: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)  # hybrid: per matrix
    sparsity: dict[str, float] = field(default_factory=dict)  # unstructured: per target

    def to_dict(self) -> dict[str, Any]:
        return {
            "outlier_ratios": self.outlier_ratios,
            "density_shifts": self.density_shifts,
            "counts": {k: [list(c) for c in v] for k, v in self.counts.items()},
            "sparsity": self.sparsity,
        }


def outlier_ratio(scores: list[torch.Tensor], threshold: float) -> float:
    """Share of all entries of ``scores`` (taken together) above ``threshold`` times their mean."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return float((flat > threshold * flat.mean()).float().mean()) if flat.numel() else 0.0


def block_scores_of(targets: list[Target], stats: dict[str, Any], transposed_weight) -> list[torch.Tensor]:
    """The OWL metric of every matrix of a block's targets (Wanda score with statistics, else |W|)."""
    out = []
    for t in targets:
        weight = transposed_weight(t)
        st = stats.get(t.name)
        for e, _ in matrices(t):
            w = weight if e is None else weight[e]
            s = st if e is None else (st[e] if st is not None else None)
            out.append(magnitude_scores(w) if s is None or s.tokens == 0 else wanda_scores(w, s))
    return out


def summarize_block(scores: list[torch.Tensor], config: HybridSparseConfig) -> Any:
    """What the allocation keeps of one decoder block's metrics: OWL's outlier ratio (``None``: no targets)."""
    return outlier_ratio(scores, config.owl_threshold) if scores else None


def _uniform_counts(config: HybridSparseConfig, r: int, c: int) -> tuple[int, int, int]:
    """The layer's DENSE/NM/TOPK block counts under the uniform allocation (per-group rounding summed)."""
    return tuple(int(v) for v in group_counts((r, c), config.tier_ratios, config.tier_group).sum(0))


def density_shifts(ratios: list[float | None], weights: list[int], lam: float) -> list[float]:
    """OWL's per-block density shifts: spread over ``[0, 2 lam]`` by outlier ratio, weighted mean zero
    (``None``: a block with nothing to prune, shift 0)."""
    known = [r for r in ratios if r is not None]
    if not known:
        return [0.0] * len(ratios)
    lo, hi = min(known), max(known)
    raw = [0.0 if r is None or hi == lo else 2 * lam * (r - lo) / (hi - lo) for r in ratios]
    weights = [0 if r is None else w for r, w in zip(ratios, weights)]
    total = sum(weights)
    mean = sum(a * w for a, w in zip(raw, weights)) / total if total else 0.0
    return [0.0 if r is None else a - mean for a, r in zip(raw, ratios)]


def _balance(desired: list[float], lo: list[int], hi: list[int]) -> list[int]:
    """Integers within ``[lo, hi]`` near ``desired`` summing to zero (largest deviation fixed first)."""
    k = [min(max(round(d), a), b) for d, a, b in zip(desired, lo, hi)]
    residual = sum(k)
    while residual:
        step = 1 if residual < 0 else -1
        movable = [i for i in range(len(k)) if (k[i] < hi[i] if step > 0 else k[i] > lo[i])]
        if not movable:
            raise TierMapError(
                "the layer-wise allocation cannot keep the model-wide tier counts: every layer is at its limit "
                "(previous tier maps or empty tiers). Use layer_allocation='uniform'."
            )
        # move the layer whose shift is furthest from its desired value in the direction of the step
        i = max(movable, key=lambda j: (desired[j] - k[j]) * step)
        k[i] += step
        residual += step
    return k


def allocate(
    plan: Plan, config: HybridSparseConfig, measured: list[Any], previous: dict[str, torch.Tensor]
) -> Allocation:
    """Per-layer targets from the dense pass's per-block summaries (see the module doc)."""
    block_ratios = measured
    weights = [sum(t.param.numel() for t in targets) for targets in plan.targets]
    shifts = density_shifts(block_ratios, weights, config.owl_lambda)
    alloc = Allocation(outlier_ratios=list(block_ratios), density_shifts=shifts)
    if config.pattern == "unstructured":
        for b, targets in enumerate(plan.targets):
            for t in targets:
                rows, cols = matrices(t)[0][1]
                group = cols if config.comparison_group == "row" else rows * cols
                target = min(max(config.sparsity - shifts[b], 0.0), 0.99)
                # snapped so that the pattern's floor() rounds to nearest: no systematic loss of sparsity
                alloc.sparsity[t.name] = (round(target * group) + 0.5) / group
        return alloc
    bs = config.block_size
    per_dense = 1.0 - config.topk_per_block / (bs * bs)  # sparsity one DENSE -> TOPK move adds, per block
    entries, desired, lo, hi = [], [], [], []
    for b, targets in enumerate(plan.targets):
        for t in targets:
            prev_all = previous.get(t.name)
            for e, (rows, cols) in matrices(t):
                r, c = rows // bs, cols // bs
                base = _uniform_counts(config, r, c)
                low, high = -base[0], base[2]
                prev = None if prev_all is None else (prev_all if e is None else prev_all[e])
                if prev is not None:
                    high = min(
                        high,
                        int((prev == DENSE).sum()) - base[0],
                        int((prev <= NM).sum()) - base[0] - base[1],
                    )
                if high < low:
                    raise TierMapError(
                        f"{t.name}: the previous tier map has fewer DENSE or DENSE-or-NM blocks than the NM share "
                        "of this iteration allows; lower the NM ratio or the DENSE ratio of the schedule."
                    )
                entries.append((t.name, base))
                desired.append(shifts[b] * r * c / per_dense)
                lo.append(low)
                hi.append(high)
    moves = _balance(desired, lo, hi)
    for (name, base), k in zip(entries, moves):
        alloc.counts.setdefault(name, []).append((base[0] + k, base[1], base[2] - k))
    return alloc
