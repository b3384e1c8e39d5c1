"""The pruning report: per-module sparsity, tier counts, overall sparsity and time."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..state import tier_maps
from ..viz import plot_tier_maps


def tier_shares(totals: dict[str, int]) -> str | None:
    """``blocks: N (DENSE a%, NM b%, TOPK c%)`` for per-tier block counts (``None`` without blocks)."""
    blocks = sum(totals.values())
    if not blocks:
        return None
    return (
        f"blocks: {blocks:,} (" + ", ".join(f"{k.upper()} {v / blocks:.1%}" for k, v in totals.items()) + ")"
    )


@dataclass
class ModuleReport:
    """Result for one pruned (or skipped) weight."""

    name: str
    shape: tuple[int, ...]
    numel: int
    pruned: int
    tier_counts: dict[str, int] | None = None
    skipped: str | None = None

    @property
    def sparsity(self) -> float:
        return self.pruned / self.numel if self.numel else 0.0


@dataclass
class SparsityReport:
    """What :func:`~hf_hybrid_sparse.apply_hybrid_sparsity` did.

    ``str(report)`` is a short summary (:meth:`summary`); :meth:`to_markdown` is the per-module table.
    """

    config: dict[str, Any]
    modules: list[ModuleReport] = field(default_factory=list)
    seconds: float = 0.0
    calibration_tokens: int = 0
    allocation: dict[str, Any] | None = (
        None  # layer_allocation="owl": outlier ratios, shifts, per-layer counts
    )
    # reconstruction_epochs > 0: each block's normalised output error before / after its reconstruction
    reconstruction: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(m.numel for m in self.modules)

    @property
    def total_pruned(self) -> int:
        return sum(m.pruned for m in self.modules)

    @property
    def sparsity(self) -> float:
        """Overall fraction of pruned weights over the targeted modules."""
        return self.total_pruned / self.total_params if self.total_params else 0.0

    def tier_totals(self) -> dict[str, int]:
        """Blocks per tier summed over all hybrid modules."""
        totals: dict[str, int] = {}
        for m in self.modules:
            for k, v in (m.tier_counts or {}).items():
                totals[k] = totals.get(k, 0) + v
        return totals

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "config": self.config,
            "modules": [asdict(m) | {"sparsity": m.sparsity} for m in self.modules],
            "sparsity": self.sparsity,
            "tier_totals": self.tier_totals(),
            "seconds": self.seconds,
            "calibration_tokens": self.calibration_tokens,
            "allocation": self.allocation,
            "reconstruction": self.reconstruction,
        }

    def summary(self) -> str:
        """A few lines: method and pattern, overall sparsity, tier shares, time and calibration tokens."""
        cfg = self.config
        pruned = [m for m in self.modules if not m.skipped]
        lines = [
            f"{cfg.get('method')} / {cfg.get('pattern')}: {len(pruned)} weights pruned "
            f"({self.total_params:,} parameters), sparsity {self.sparsity:.2%}"
            + (f", {len(self.modules) - len(pruned)} skipped" if len(pruned) < len(self.modules) else ""),
        ]
        blocks = tier_shares(self.tier_totals())
        if blocks:
            lines.append(blocks)
        if self.allocation:
            sparsities = [m.sparsity for m in pruned]
            lines.append(
                f"allocation: {cfg.get('layer_allocation')} (per-layer sparsity "
                f"{min(sparsities):.1%}..{max(sparsities):.1%}; per-layer tiers in the table)"
            )
        if self.reconstruction:
            before = sum(r["before"] for r in self.reconstruction) / len(self.reconstruction)
            after = sum(r["after"] for r in self.reconstruction) / len(self.reconstruction)
            lines.append(
                f"reconstruction: mean block output error vs dense {before:.4g} -> {after:.4g} "
                f"({len(self.reconstruction)} blocks)"
            )
        lines.append(f"time: {self.seconds:.1f} s on {self.calibration_tokens:,} calibration tokens")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """A markdown table, one row per module, plus a total row."""
        lines = [
            "| module | shape | sparsity | dense | nm | topk | note |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for m in self.modules:
            tc = m.tier_counts or {}
            lines.append(
                f"| {m.name} | {'x'.join(map(str, m.shape))} | {m.sparsity:.2%} | "
                f"{tc.get('dense', '')} | {tc.get('nm', '')} | {tc.get('topk', '')} | {m.skipped or ''} |"
            )
        tt = self.tier_totals()
        lines.append(
            f"| **total** | {self.total_params:,} params | **{self.sparsity:.2%}** | {tt.get('dense', '')} | "
            f"{tt.get('nm', '')} | {tt.get('topk', '')} | |"
        )
        return "\n".join(lines)

    def plot_tier_maps(self, model: Any, out_file: str) -> Any:
        """Draw the model's tier maps into ``out_file`` (PNG pages; extra ``[viz]``); returns the paths."""
        return plot_tier_maps(tier_maps(model), out_file)

    def __str__(self) -> str:
        return self.summary()
