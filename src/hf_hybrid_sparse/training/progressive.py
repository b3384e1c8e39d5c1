"""Progressive three-tier pruning: scheduled iterations, tier maps carried forward, fine-tuning between them.

Iteration ``i``: prune with the schedule's target ratios, the tier maps of iteration ``i-1`` (on the
modules) as input, so blocks only move DENSE -> NM -> TOPK and the ones that move are the
lowest-scoring of their tier under the current weights; then fine-tune with ``SparseTrainer`` (full
or mask-aware LoRA, merged), evaluate, and save a complete checkpoint
``OUTPUT/iteration-NNN/`` (model with masks and tier maps, tokenizer, ``progress.json``) atomically.

Resuming continues after the last complete checkpoint; every random choice is seeded from the
iteration number, so a run killed at any point and resumed ends with the same tier maps and weights
as an uninterrupted one. ``OUTPUT/run.json`` pins the schedule and the model a folder belongs to.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..api import apply_hybrid_sparsity
from ..checkpoint.saving import save_pruned
from ..config import HybridSparseConfig
from ..data.calibration import CalibrationSet, lm_dataset
from ..errors import HybridSparseError
from ..evaluation.perplexity import perplexity
from ..logs import get_logger
from .distill import DistillationConfig, dense_teacher
from .lora import get_sparse_peft_model, merge_sparse_lora
from .schedule import Iteration, schedule_fingerprint
from .trainer import SparseTrainer

logger = get_logger(__name__)

DENSE_FILE = "dense.json"
PROGRESS_FILE = "progress.json"
RUN_FILE = "run.json"


@dataclass
class ProgressiveSettings:
    """Everything but the schedule: the base recipe, data, fine-tuning and evaluation."""

    config: HybridSparseConfig = field(default_factory=HybridSparseConfig)
    calib: Any = "wiki_offline"
    train_data: Any = None  # default: the calibration data
    train_seqlen: int = 256
    finetune_steps: int = 0
    learning_rate: float = 5e-5
    batch_size: int = 4
    lora_r: int = 0
    lora_targets: list[str] | None = None
    eval_data: Any = "wiki_offline"
    eval_seqlen: int = 256
    eval_windows: int | None = 8  # None: no evaluation
    seed: int = 0
    distillation: DistillationConfig | None = None  # fine-tune against the dense starting model


def _iteration_dir(output: Path, it: Iteration) -> Path:
    return output / f"iteration-{it.iteration:03d}"


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


_NOT_PINNED = ("device", "offload_activations", "use_kernels")  # where it runs, not what it computes


def _describe(data: Any) -> Any:
    """A JSON-able identity of a data argument (names and paths as given, other data by content hash)."""
    if data is None or isinstance(data, (str, int, float)):
        return data
    if isinstance(data, CalibrationSet):
        return {**data.to_dict(), "source": _describe(data.source)}
    fingerprint = getattr(data, "_fingerprint", None)  # datasets.Dataset
    if isinstance(fingerprint, str):
        return f"dataset:{fingerprint}"
    digest = hashlib.sha256()
    if isinstance(data, torch.Tensor):
        digest.update(data.detach().cpu().contiguous().numpy().tobytes())
    else:
        digest.update(repr(data).encode("utf-8", "replace"))
    return f"{type(data).__name__}:{digest.hexdigest()[:16]}"


def pinned_settings(settings: ProgressiveSettings) -> dict[str, Any]:
    """Every setting that shapes a progressive run's result (what a resume must not change)."""
    recipe = {k: v for k, v in settings.config.to_dict().items() if k not in _NOT_PINNED}
    extra = {} if settings.distillation is None else {"distillation": settings.distillation.to_dict()}
    return extra | {
        "recipe": recipe,
        "calib": _describe(settings.calib),
        "train_data": _describe(settings.train_data),
        "train_seqlen": settings.train_seqlen,
        "finetune_steps": settings.finetune_steps,
        "learning_rate": settings.learning_rate,
        "batch_size": settings.batch_size,
        "lora_r": settings.lora_r,
        "lora_targets": settings.lora_targets,
        "eval_data": _describe(settings.eval_data),
        "eval_seqlen": settings.eval_seqlen,
        "eval_windows": settings.eval_windows,
        "seed": settings.seed,
    }


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _check_run_folder(output: Path, schedule: list[Iteration], run: dict[str, Any], resume: bool) -> int:
    """Validate/initialise the output folder; return how many iterations of ``schedule`` are complete."""
    output.mkdir(parents=True, exist_ok=True)
    run_file = output / RUN_FILE
    done = 0
    while done < len(schedule) and (_iteration_dir(output, schedule[done]) / PROGRESS_FILE).exists():
        done += 1
    if run_file.exists():
        try:
            saved = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError):
            raise HybridSparseError(f"{run_file} is unreadable; use a new output folder.") from None
        if not resume:
            raise HybridSparseError(
                f"{output} already holds a progressive run; pass resume=True (--resume) or a new folder."
            )
        if saved.get("schedule") != run["schedule"]:
            raise HybridSparseError(
                f"{output} belongs to another schedule (fingerprint {saved.get('schedule')}, now {run['schedule']})."
            )
        if saved.get("model") != run["model"]:
            raise HybridSparseError(
                f"{output} belongs to another model ({saved.get('model')!r}, now {run['model']!r})."
            )
        changed = _differences(saved.get("settings", {}), run["settings"])
        if changed:
            raise HybridSparseError(
                f"resuming {output} with other settings than the run was started with ({'; '.join(changed[:4])}); "
                "resume with the same settings, or start a new run in a new folder."
            )
    else:
        if any(output.glob("iteration-*")):
            raise HybridSparseError(
                f"{output} holds iteration folders but no {RUN_FILE}: it cannot be told which run they belong to. "
                "Use a new output folder."
            )
        _write_json_atomic(run_file, run)
    for it in schedule[:done]:
        progress = json.loads((_iteration_dir(output, it) / PROGRESS_FILE).read_text())
        if progress.get("run") != _run_digest(run):
            raise HybridSparseError(
                f"{_iteration_dir(output, it)} was made by another run than {RUN_FILE} describes; use a new folder."
            )
    return done


def _run_digest(run: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]


def _tier_ratios(report) -> list[float]:
    totals = report.tier_totals()
    n = sum(totals.values()) or 1
    return [totals.get("dense", 0) / n, totals.get("nm", 0) / n, totals.get("topk", 0) / n]


def _finetune(model, tokenizer, settings: ProgressiveSettings, it: Iteration, workdir: str, teacher=None):
    from transformers import TrainingArguments

    steps = it.finetune_steps if it.finetune_steps is not None else settings.finetune_steps
    if steps <= 0:
        return model, 0.0
    n = steps * settings.batch_size
    data = settings.train_data if settings.train_data is not None else settings.calib
    windows = lm_dataset(data, tokenizer, settings.train_seqlen, max_samples=n * it.iteration)
    start = (n * (it.iteration - 1)) % max(len(windows), 1)
    train = windows.select([(start + k) % len(windows) for k in range(min(n, len(windows)))])
    target = model
    if settings.lora_r > 0:
        from peft import LoraConfig

        targets = settings.lora_targets or [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        target = get_sparse_peft_model(
            model, LoraConfig(r=settings.lora_r, lora_alpha=2 * settings.lora_r, target_modules=targets)
        )
    args = TrainingArguments(
        output_dir=workdir,
        max_steps=steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=it.learning_rate or settings.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        seed=settings.seed + it.iteration,
        data_seed=settings.seed + it.iteration,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=not any(p.is_cuda for p in model.parameters()),
    )
    start_t = time.perf_counter()
    distill = {} if teacher is None else {"teacher_model": teacher, "distillation": settings.distillation}
    SparseTrainer(model=target, args=args, train_dataset=train, **distill).train()
    if settings.lora_r > 0:
        model, _ = merge_sparse_lora(target)
    return model, time.perf_counter() - start_t


def run_progressive(
    model,
    tokenizer,
    schedule: list[Iteration],
    settings: ProgressiveSettings,
    output_dir: str | os.PathLike,
    resume: bool = True,
    model_id: str | None = None,
    stop_after: int | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) the schedule; returns the per-iteration summary (also in ``OUTPUT/summary.json``).

    ``model_id`` names the starting model for the resume check (default: its ``name_or_path``).
    ``stop_after`` ends the call after that many iterations in total (the run can be resumed later).
    """
    from transformers import AutoModelForCausalLM

    output = Path(output_dir)
    fingerprint = schedule_fingerprint(schedule)
    model_id = model_id or str(getattr(model, "name_or_path", "") or type(model).__name__)
    run = {"schedule": fingerprint, "model": model_id, "settings": pinned_settings(settings)}
    done = _check_run_folder(output, schedule, run, resume)
    # the teacher is the dense model this run started from (also when resuming: `model` is that model)
    teacher = dense_teacher(model) if settings.distillation is not None else None
    summary: list[dict[str, Any]] = []
    if done:
        last = _iteration_dir(output, schedule[done - 1])
        dtype = next(model.parameters()).dtype
        model = AutoModelForCausalLM.from_pretrained(last, dtype=dtype)
        summary = (
            json.loads((output / "summary.json").read_text()) if (output / "summary.json").exists() else []
        )
        summary = [s for s in summary if s["iteration"] <= schedule[done - 1].iteration]
        logger.info(f"Resuming after iteration {schedule[done - 1].iteration} from {last}")
    elif _evaluates(settings, tokenizer) and not (output / DENSE_FILE).exists():
        # the dense baseline every iteration is compared with (summary.md, plots)
        _write_json_atomic(
            output / DENSE_FILE, {"perplexity": _perplexity(model, tokenizer, settings), "sparsity": 0.0}
        )
    dense = dense_baseline(output)
    for position, it in enumerate(schedule[done:], start=done):
        if stop_after is not None and position >= stop_after:
            break
        cfg_dict = settings.config.to_dict() | {
            "pattern": "hybrid",
            "tier_ratios": list(it.ratios),
            "seed": settings.seed + it.iteration,
        }
        if it.topk_per_block is not None:
            cfg_dict["topk_per_block"] = it.topk_per_block
        config = HybridSparseConfig.from_dict(cfg_dict)
        t0 = time.perf_counter()
        report = apply_hybrid_sparsity(model, config, it.calib or settings.calib, tokenizer=tokenizer)
        prune_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as work:
            model, train_s = _finetune(model, tokenizer, settings, it, work, teacher)
        entry: dict[str, Any] = {
            "iteration": it.iteration,
            "position": position + 1,
            "of": len(schedule),
            "target_ratios": list(it.ratios),
            "tier_ratios": _tier_ratios(report),
            "sparsity": report.sparsity,
            "prune_seconds": prune_s,
            "finetune_seconds": train_s,
        }
        if _evaluates(settings, tokenizer):
            entry["perplexity"] = _perplexity(model, tokenizer, settings)
        summary.append(entry)
        progress = {"schedule": fingerprint, "model": model_id, "run": _run_digest(run), **entry}
        save_pruned(
            model,
            _iteration_dir(output, it),
            tokenizer=tokenizer,
            report=report.to_dict(),
            extra={PROGRESS_FILE: progress},
        )
        _write_json_atomic(output / "summary.json", summary)
        (output / "summary.md").write_text(summary_markdown(summary, dense))
        logger.info(f"iteration {it.iteration}: sparsity {report.sparsity:.2%}, tiers {entry['tier_ratios']}")
    return summary


def _evaluates(settings: ProgressiveSettings, tokenizer: Any) -> bool:
    return settings.eval_windows is not None and tokenizer is not None


def _perplexity(model, tokenizer, settings: ProgressiveSettings) -> float:
    """Perplexity by the run's evaluation settings (the same protocol for the dense model and every iteration)."""
    model.eval()
    return perplexity(
        model, tokenizer, settings.eval_data, seqlen=settings.eval_seqlen, max_windows=settings.eval_windows
    ).perplexity


def dense_baseline(output_dir: str | os.PathLike) -> dict[str, float] | None:
    """The dense model's perplexity measured at the start of a run (``OUTPUT/dense.json``), if any."""
    path = Path(output_dir) / DENSE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def summary_markdown(summary: list[dict[str, Any]], dense: dict[str, float] | None = None) -> str:
    """The per-iteration summary as a markdown table (a first ``dense`` row when the baseline is known)."""
    lines = [
        "| iteration | target D/NM/T | achieved D/NM/T | sparsity | perplexity | prune s | finetune s |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    if dense is not None:
        lines.append(f"| dense | 1/0/0 | 1/0/0 | 0.00% | {dense['perplexity']:.3f} | | |")
    for s in summary:
        t = "/".join(f"{x:.3f}" for x in s["target_ratios"])
        a = "/".join(f"{x:.3f}" for x in s["tier_ratios"])
        ppl = f"{s['perplexity']:.3f}" if "perplexity" in s else ""
        lines.append(
            f"| {s['iteration']} | {t} | {a} | {s['sparsity']:.2%} | {ppl} | {s['prune_seconds']:.1f} | "
            f"{s['finetune_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["ProgressiveSettings", "dense_baseline", "run_progressive", "summary_markdown"]
