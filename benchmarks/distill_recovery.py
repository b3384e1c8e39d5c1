"""Recovery with distillation from the dense teacher, on the embedded SmolLM2-135M (CPU).

    python benchmarks/distill_recovery.py [--parts unstructured,progressive] [--methods sparsegpt,wanda]
        [--steps 100] [--progressive_steps 50 | --progressive_split 50,100,150] [--ce]

unstructured: 50% unstructured (32 x 512 calibration tokens) with each of ``--methods``, then ``--steps``
full fine-tuning steps of 4 x 256 tokens (train split) distilling from the dense teacher (KL, T=2); with
``--ce`` also the same steps with plain cross-entropy, for comparison; ``--ce_weight`` adds the labels'
cross-entropy to the KL; ``--dense_ce`` / ``--dense_kd`` give the dense model the same cross-entropy /
distillation steps (the equally trained reference); ``--layer_allocation owl`` spreads the 50% over layers
by OWL (``--owl_lambda``: its largest shift, ``--owl_threshold``: its outlier threshold M; part of the
name when not 0.08 and 5); ``--oneshot_only`` prunes and
measures without recovery steps; ``--nsamples`` sets the calibration windows (part of the name when not 32); ``--gradual S`` prunes to S
first, spends half the steps, then prunes to 50% and spends the other half (a learning-rate schedule
restarts for each half); ``--hidden_weight`` adds the per-block normalised hidden-state loss to the KL;
``--reconstruction_epochs`` adds block-wise reconstruction (calibration batches of 4) to every pruning;
``--lora_r R`` recovers the unstructured models through mask-aware LoRA of rank R (alpha 2R, all 7
projections, merged before the evaluation) instead of full fine-tuning.
progressive: SparseGPT hybrid, row tiers, OWL allocation, to (0.35, 0.45, 0.20) in three iterations
(0.7/0.3/0 -> 0.5/0.4/0.1 -> 0.35/0.45/0.2), ``--progressive_steps`` distillation steps after each (or
``--progressive_split``'s count after each). Perplexity on held-out test-split windows of 256 tokens; every
result carries the dense perplexity measured in the same run. ``--temperature``, ``--lr``,
``--lr_scheduler`` and ``--warmup_steps`` set the recovery steps and are part of a result's name when not
the default. Results are appended to the JSON (a rerun skips what is there).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

from _common import LLAMA_PROJECTIONS, machine, out, smollm2_perplexity, train
from peft import LoraConfig
from transformers.utils import logging as hf_logging

from hf_hybrid_sparse import (
    DistillationConfig,
    HybridSparseConfig,
    apply_hybrid_sparsity,
    dense_teacher,
    get_sparse_peft_model,
    merge_sparse_lora,
    sparsity_masks,
)
from hf_hybrid_sparse.data.calibration import lm_dataset
from hf_hybrid_sparse.models import load_model_and_tokenizer
from hf_hybrid_sparse.training.progressive import ProgressiveSettings, run_progressive
from hf_hybrid_sparse.training.schedule import Iteration

SCHEDULE = [(0.7, 0.3, 0.0), (0.5, 0.4, 0.1), (0.35, 0.45, 0.2)]


def _revived(model) -> int:
    params = dict(model.named_parameters())
    return sum(int((params[k][~m] != 0).sum()) for k, m in sparsity_masks(model).items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="unstructured,progressive")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--progressive_steps", type=int, default=50)
    ap.add_argument(
        "--progressive_split",
        default="",
        help="steps per iteration, e.g. 50,100,150 (overrides --progressive_steps; the sum is the budget)",
    )
    ap.add_argument("--methods", default="sparsegpt,wanda")
    ap.add_argument("--ce", action="store_true", help="also fine-tune with plain cross-entropy")
    ap.add_argument(
        "--dense_ce",
        action="store_true",
        help="fine-tune the dense model with the same cross-entropy steps (how much is fitting the corpus)",
    )
    ap.add_argument(
        "--dense_kd",
        action="store_true",
        help="train the dense model with the same distillation loss (its own copy as teacher)",
    )
    ap.add_argument(
        "--reconstruction_epochs", type=int, default=0, help="block-wise reconstruction in every pruning"
    )
    ap.add_argument("--reconstruction_lr", type=float, default=1e-4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument(
        "--hidden_weight", type=float, default=0.0, help="add the per-block hidden-state loss (SquareHead)"
    )
    ap.add_argument("--temperature", type=float, default=2.0, help="distillation temperature T")
    ap.add_argument(
        "--ce_weight", type=float, default=0.0, help="add the labels' cross-entropy to the KL (KD + CE)"
    )
    ap.add_argument(
        "--lr_scheduler",
        default="constant",
        help="learning-rate schedule of the recovery steps (e.g. cosine)",
    )
    ap.add_argument("--warmup_steps", type=int, default=0)
    ap.add_argument(
        "--layer_allocation", default="uniform", help="uniform or owl, for the unstructured pruning"
    )
    ap.add_argument(
        "--owl_lambda", type=float, default=0.08, help="OWL's largest density shift of a block (default 0.08)"
    )
    ap.add_argument(
        "--owl_threshold", type=float, default=5.0, help="OWL's outlier threshold M, x the mean (default 5)"
    )
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows of 512 tokens (default 32)")
    ap.add_argument(
        "--gradual",
        type=float,
        default=None,
        help="unstructured in two steps: prune to this sparsity, half the recovery steps, prune to 50%% "
        "(the first mask kept), the other half on the next windows",
    )
    ap.add_argument(
        "--oneshot_only", action="store_true", help="prune and measure only, no recovery steps (sweeps)"
    )
    ap.add_argument(
        "--lora_r",
        type=int,
        default=0,
        help="recover through mask-aware LoRA of this rank on all 7 projections (merged before the "
        "evaluation) instead of full fine-tuning",
    )
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval_windows", type=int, default=24)
    ap.add_argument("--json", default="benchmarks/distill_recovery.json")
    args = ap.parse_args()
    split = (
        [int(s) for s in args.progressive_split.split(",")]
        if args.progressive_split
        else [args.progressive_steps] * len(SCHEDULE)
    )
    if len(split) != len(SCHEDULE):
        raise SystemExit(f"--progressive_split needs {len(SCHEDULE)} step counts, got {split}")
    hf_logging.set_verbosity_warning()
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {}
    model, tok = load_model_and_tokenizer()
    teacher = dense_teacher(model)
    distill = DistillationConfig(
        temperature=args.temperature, hidden_weight=args.hidden_weight, ce_weight=args.ce_weight
    )

    def ppl(m):
        return smollm2_perplexity(m, tok, args.seqlen, args.eval_windows)

    def save():
        results["machine"] = machine()
        results["setup"] = vars(args)
        path.write_text(json.dumps(results, indent=2))

    if "dense" not in results:
        results["dense"] = ppl(model)
        save()
    # the unstructured runs' training windows (the progressive runs draw their own); windows are the
    # corpus's first ones, so the same steps always see the same data
    data = lm_dataset("wiki_offline", tok, args.seqlen, max_samples=args.steps * args.batch)
    calib = dict(nsamples=args.nsamples, seqlen=512)
    tag = "" if args.nsamples == 32 else f" (calibration {args.nsamples} x 512)"
    if args.reconstruction_epochs:
        calib |= dict(
            reconstruction_epochs=args.reconstruction_epochs,
            reconstruction_lr=args.reconstruction_lr,
            batch_size=4,
        )
        tag += f" + reconstruction {args.reconstruction_epochs} ep lr {args.reconstruction_lr:g}"
    # the learning rate of the recovery steps is part of a result's name when it is not the default
    steps_tag = "" if args.lr == 1e-4 else f" (lr {args.lr:g})"
    if args.temperature != 2.0:
        steps_tag += f" (T {args.temperature:g})"
    if args.hidden_weight:
        steps_tag += f" + hidden {args.hidden_weight:g}"
    if args.ce_weight:
        steps_tag += f" + CE {args.ce_weight:g}"
    if args.lr_scheduler != "constant" or args.warmup_steps:
        steps_tag += f" ({args.lr_scheduler}, warmup {args.warmup_steps})"
    if args.lora_r:
        steps_tag += f" (LoRA r {args.lora_r})"

    kd_kwargs = {"teacher_model": teacher, "distillation": distill}
    sched = {"lr_scheduler_type": args.lr_scheduler, "warmup_steps": args.warmup_steps}

    def run(name, pruned, steps, kd: bool):
        if name in results:
            return
        subset = data.select(range(min(len(data), steps * args.batch)))
        if args.lora_r:
            pruned = get_sparse_peft_model(
                pruned,
                LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=LLAMA_PROJECTIONS),
            )
        seconds = train(pruned, subset, steps, args.batch, args.lr, kd_kwargs if kd else {}, **sched)
        if args.lora_r:
            pruned, _ = merge_sparse_lora(pruned)
        results[name] = {"perplexity": ppl(pruned), "train_seconds": seconds, "revived": _revived(pruned)}
        save()
        out(f"{name}: {results[name]}")

    def gradual(key: str, cfg: HybridSparseConfig) -> None:
        """Prune to ``--gradual``, distil half the steps, prune to 50% (earlier pruned weights stay
        pruned), distil the other half on the next windows: the same 100 steps and data in all."""
        name = (
            f"{key.replace('50%', f'{args.gradual:g} -> 50%', 1)} gradual + {args.steps} steps KD{steps_tag}"
        )
        if name in results:
            return
        half = args.steps // 2
        pruned = copy.deepcopy(model)
        first = apply_hybrid_sparsity(
            pruned,
            HybridSparseConfig.from_dict(cfg.to_dict() | {"sparsity": args.gradual}),
            "wiki_offline",
            tokenizer=tok,
        )
        first_half = data.select(range(half * args.batch))
        seconds = train(pruned, first_half, half, args.batch, args.lr, kd_kwargs, **sched)
        middle = ppl(pruned)
        second = apply_hybrid_sparsity(pruned, cfg, "wiki_offline", tokenizer=tok)
        pruned_again = ppl(pruned)
        rest = data.select(range(half * args.batch, args.steps * args.batch))
        seconds += train(pruned, rest, args.steps - half, args.batch, args.lr, kd_kwargs, **sched)
        results[name] = {
            "perplexity": ppl(pruned),
            "sparsity": second.sparsity,
            "first_sparsity": first.sparsity,
            "after_first_half": middle,
            "after_second_pruning": pruned_again,
            "train_seconds": seconds,
            "revived": _revived(pruned),
        }
        save()
        out(f"{name}: {results[name]}")

    parts = args.parts.split(",")
    if args.dense_ce:
        run(f"dense + {args.steps} steps CE{steps_tag}", copy.deepcopy(model), args.steps, kd=False)
    if args.dense_kd:
        run(f"dense + {args.steps} steps KD{steps_tag}", copy.deepcopy(model), args.steps, kd=True)
    if "unstructured" in parts:
        for method in args.methods.split(","):
            owl = " (owl)" if args.layer_allocation != "uniform" else ""
            if owl and (args.owl_lambda != 0.08 or args.owl_threshold != 5.0):
                owl = f" (owl, lambda {args.owl_lambda:g}, M {args.owl_threshold:g})"
            key = f"{method} unstructured 50%{owl}{tag}"
            wanted = [key, f"{key} + {args.steps} steps KD{steps_tag}"]
            wanted += [f"{key} + {args.steps} steps CE{steps_tag}"] if args.ce else []
            wanted = wanted[:1] if args.oneshot_only else wanted
            cfg = HybridSparseConfig(
                method=method,
                pattern="unstructured",
                sparsity=0.5,
                layer_allocation=args.layer_allocation,
                owl_lambda=args.owl_lambda,
                owl_threshold=args.owl_threshold,
                **calib,
            )
            if args.gradual is not None:
                gradual(key, cfg)
                continue
            if all(k in results for k in wanted):  # a rerun adds only what is missing: no pruning for nothing
                continue
            pruned = copy.deepcopy(model)
            report = apply_hybrid_sparsity(pruned, cfg, "wiki_offline", tokenizer=tok)
            if key not in results:
                results[key] = {"perplexity": ppl(pruned), "sparsity": report.sparsity}
                save()
            if args.oneshot_only:
                continue
            if args.ce:
                run(f"{key} + {args.steps} steps CE{steps_tag}", copy.deepcopy(pruned), args.steps, kd=False)
            run(f"{key} + {args.steps} steps KD{steps_tag}", pruned, args.steps, kd=True)
    if "progressive" in parts:
        cfg = HybridSparseConfig(method="sparsegpt", tier_group="row", layer_allocation="owl", **calib)
        steps_name = f"3 x {split[0]}" if len(set(split)) == 1 else "+".join(map(str, split))
        key = f"sparsegpt hybrid (row, owl{tag}) progressive {steps_name} steps KD{steps_tag}"
        if key not in results:
            settings = ProgressiveSettings(
                config=cfg,
                calib="wiki_offline",
                train_seqlen=args.seqlen,
                finetune_steps=args.progressive_steps,
                learning_rate=args.lr,
                batch_size=args.batch,
                eval_seqlen=args.seqlen,
                eval_windows=args.eval_windows,
                distillation=distill,
            )
            schedule = [
                Iteration(i + 1, r, finetune_steps=s) for i, (r, s) in enumerate(zip(SCHEDULE, split))
            ]
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as folder:
                summary = run_progressive(copy.deepcopy(model), tok, schedule, settings, folder)
            results[key] = {
                "perplexity": summary[-1]["perplexity"],
                "sparsity": summary[-1]["sparsity"],
                "iterations": [
                    {k: s[k] for k in ("iteration", "tier_ratios", "sparsity", "perplexity")} for s in summary
                ],
                "seconds": time.perf_counter() - start,
            }
            save()
            out(f"{key}: {results[key]}")
    dense = results["dense"]
    out(f"\n| model | perplexity | vs dense ({dense:.2f}) |\n|---|---:|---:|")
    for name, r in results.items():
        if isinstance(r, dict) and "perplexity" in r:
            out(f"| {name} | {r['perplexity']:.2f} | {r['perplexity'] / dense:.2f}x |")


if __name__ == "__main__":
    main()
