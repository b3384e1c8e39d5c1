"""Progressive schedules: one row per iteration with the target DENSE / NM / TOPK block ratios.

CSV (or YAML: a list of mappings, or ``{"iterations": [...]}``) with columns

* ``iteration`` -- 1, 2, 3, ... (rows are sorted by it);
* the targets ``target_dense_ratio, target_2_4_ratio, target_topk_ratio`` (``dense, nm, topk`` are
  accepted too), each row summing to 1; **or** the per-iteration transitions
  ``dense_to_2_4_ratio`` (share of the current DENSE blocks that move to NM) and
  ``mid_2_4_to_topk_ratio`` (share of the NM blocks, after that move, that go on to TOPK), from
  which the targets are derived starting at all-DENSE; when both are given the targets rule;
* optional per-iteration settings: ``topk_per_block``, ``calib`` (calibration set name),
  ``finetune_steps``, ``learning_rate``.

Blocks only move DENSE -> NM -> TOPK, so between iterations the DENSE ratio may not rise, the TOPK
ratio may not fall, and DENSE + NM may not rise. Each iteration's tier counts follow the rounding
rule of :mod:`hf_hybrid_sparse.pruning.patterns` (cumulative round-half-up per group).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ScheduleError


@dataclass
class Iteration:
    """One row of a schedule."""

    iteration: int
    ratios: tuple[float, float, float]
    topk_per_block: int | None = None
    calib: str | None = None
    finetune_steps: int | None = None
    learning_rate: float | None = None


_TARGETS = [("target_dense_ratio", "dense"), ("target_2_4_ratio", "nm"), ("target_topk_ratio", "topk")]
_OPTIONAL = {"topk_per_block": int, "calib": str, "finetune_steps": int, "learning_rate": float}


def _get(row: dict[str, Any], *names: str) -> Any:
    for n in names:
        if n in row and row[n] not in (None, ""):
            return row[n]
    return None


def _num(value: Any, column: str, lineno: int, kind=float):
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise ScheduleError(
            f"schedule row {lineno}: column {column!r} has {value!r}, not a number."
        ) from None


def parse_rows(rows: list[dict[str, Any]]) -> list[Iteration]:
    """Validate rows (dicts of column -> value) into iterations (see module docstring)."""
    if not rows:
        raise ScheduleError("the schedule has no rows.")
    out = []
    prev = (1.0, 0.0, 0.0)
    keyed = []
    for lineno, row in enumerate(rows, 1):
        row = {str(k).strip(): v for k, v in row.items()}
        if _get(row, "iteration") is None:
            raise ScheduleError(
                f"schedule row {lineno}: missing column 'iteration' (columns: {sorted(row)})."
            )
        keyed.append((_num(row["iteration"], "iteration", lineno, int), lineno, row))
    keyed.sort()
    for idx, lineno, row in keyed:
        targets = [_get(row, *names) for names in _TARGETS]
        if all(t is not None for t in targets):
            ratios = tuple(_num(t, names[0], lineno) for t, names in zip(targets, _TARGETS))
        elif any(t is not None for t in targets):
            missing = [names[0] for t, names in zip(targets, _TARGETS) if t is None]
            raise ScheduleError(f"schedule row {lineno}: missing column(s) {missing}.")
        else:
            a, b = _get(row, "dense_to_2_4_ratio"), _get(row, "mid_2_4_to_topk_ratio")
            if a is None or b is None:
                raise ScheduleError(
                    f"schedule row {lineno}: give target_dense_ratio/target_2_4_ratio/target_topk_ratio, or "
                    f"dense_to_2_4_ratio and mid_2_4_to_topk_ratio (columns: {sorted(row)})."
                )
            a, b = _num(a, "dense_to_2_4_ratio", lineno), _num(b, "mid_2_4_to_topk_ratio", lineno)
            if not (0 <= a <= 1 and 0 <= b <= 1):
                raise ScheduleError(f"schedule row {lineno}: transition ratios must lie in [0, 1].")
            dense = prev[0] * (1 - a)
            nm_mid = prev[1] + prev[0] * a
            ratios = (dense, nm_mid * (1 - b), prev[2] + nm_mid * b)
        if any(r < -1e-9 for r in ratios):
            raise ScheduleError(f"schedule row {lineno} (iteration {idx}): negative ratio in {ratios}.")
        if abs(sum(ratios) - 1) > 1e-6:
            raise ScheduleError(
                f"schedule row {lineno} (iteration {idx}): ratios {ratios} sum to {sum(ratios):.6g}, not 1."
            )
        if ratios[0] > prev[0] + 1e-9:
            raise ScheduleError(
                f"iteration {idx}: the DENSE ratio rises from {prev[0]:.4g} to {ratios[0]:.4g}; blocks never move back "
                "to DENSE."
            )
        if ratios[2] < prev[2] - 1e-9:
            raise ScheduleError(
                f"iteration {idx}: the TOPK ratio falls from {prev[2]:.4g} to {ratios[2]:.4g}."
            )
        if ratios[0] + ratios[1] > prev[0] + prev[1] + 1e-9:
            raise ScheduleError(f"iteration {idx}: DENSE + NM rises; blocks never leave TOPK.")
        extra = {}
        for key, kind in _OPTIONAL.items():
            value = _get(row, key)
            if value is not None:
                extra[key] = _num(value, key, lineno, kind) if kind is not str else str(value)
        out.append(Iteration(iteration=idx, ratios=tuple(max(r, 0.0) for r in ratios), **extra))
        prev = ratios
    if len({it.iteration for it in out}) != len(out):
        raise ScheduleError("the schedule repeats an iteration number.")
    return out


def load_schedule(path: str | Path) -> list[Iteration]:
    """Read a CSV or YAML schedule file (see module docstring)."""
    path = Path(path)
    if not path.exists():
        raise ScheduleError(f"schedule file {path} does not exist.")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
            rows = doc.get("iterations") if isinstance(doc, dict) else doc
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise ScheduleError(f"{path}: expected a list of iterations (mappings).")
        else:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ScheduleError(f"cannot read schedule {path}: {exc}") from None
    except Exception as exc:  # yaml errors
        if isinstance(exc, ScheduleError):
            raise
        raise ScheduleError(f"cannot parse schedule {path}: {exc}") from None
    return parse_rows(rows)


def schedule_fingerprint(schedule: list[Iteration]) -> str:
    """A hash identifying the schedule (a resume folder must have been made with the same one)."""
    text = json.dumps([asdict(it) for it in schedule], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
