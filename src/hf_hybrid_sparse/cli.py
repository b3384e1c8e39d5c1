"""Command line: ``hf-hybrid-sparse prune ...`` (arguments parsed with ``HfArgumentParser``)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser
from transformers.utils import logging as hf_logging

from .config import HybridSparseConfig
from .errors import HybridSparseError

logger = hf_logging.get_logger("hf_hybrid_sparse")


@dataclass
class ModelArguments:
    """Which model to load."""

    model: str = field(
        default="smollm2",
        metadata={
            "help": "Model folder, Hub id, .gguf file, or 'smollm2' (the embedded SmolLM2-135M-Instruct)."
        },
    )
    dtype: str = field(
        default="float32", metadata={"help": "Weights dtype: float32, bfloat16, float16 or auto."}
    )
    device_map: str | None = field(default=None, metadata={"help": "accelerate device_map, e.g. 'auto'."})


@dataclass
class PruneArguments:
    """The pruning recipe (see HybridSparseConfig) and its calibration data."""

    method: str = field(default="wanda", metadata={"help": "magnitude | wanda | sparsegpt"})
    pattern: str = field(default="hybrid", metadata={"help": "unstructured | N:M (e.g. 2:4) | hybrid"})
    sparsity: float = field(default=0.5, metadata={"help": "Sparsity of the unstructured pattern."})
    comparison_group: str = field(default="row", metadata={"help": "row | layer (unstructured)"})
    block_size: int = 16
    tier_ratios: str = field(default="0.35,0.45,0.20", metadata={"help": "DENSE,NM,TOPK block fractions."})
    tier_group: str = field(default="layer", metadata={"help": "layer | row"})
    nm: str = field(default="2:4", metadata={"help": "N:M inside NM blocks."})
    topk_per_block: int = 15
    indivisible: str = field(default="error", metadata={"help": "error | skip (layers that do not tile)"})
    calib: str = field(
        default="wiki_offline", metadata={"help": "Calibration data: a name or a .txt/.jsonl path."}
    )
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 8
    targets: str | None = field(default=None, metadata={"help": "Comma-separated module names to prune."})
    ignore: str = field(default="lm_head", metadata={"help": "Comma-separated module names to leave dense."})
    dampening: float = 0.01
    sparsegpt_blocksize: int = 128
    device: str | None = field(default=None, metadata={"help": "Compute device for the block being pruned."})
    offload_activations: bool = False

    def to_config(self) -> HybridSparseConfig:
        """The :class:`HybridSparseConfig` these arguments describe (validated)."""
        try:
            ratios = tuple(float(x) for x in self.tier_ratios.split(","))
        except ValueError:
            raise HybridSparseError(
                f"--tier_ratios {self.tier_ratios!r} is not three comma-separated numbers."
            ) from None

        def names(text: str | None) -> list[str] | None:
            return None if text is None else [t.strip() for t in text.split(",") if t.strip()]

        return HybridSparseConfig(
            method=self.method,
            pattern=self.pattern,
            sparsity=self.sparsity,
            comparison_group=self.comparison_group,
            block_size=self.block_size,
            tier_ratios=ratios,
            tier_group=self.tier_group,
            nm=self.nm,
            topk_per_block=self.topk_per_block,
            indivisible=self.indivisible,
            nsamples=self.nsamples,
            seqlen=self.seqlen,
            seed=self.seed,
            batch_size=self.batch_size,
            targets=names(self.targets),
            ignore=names(self.ignore) or [],
            dampening=self.dampening,
            sparsegpt_blocksize=self.sparsegpt_blocksize,
            device=self.device,
            offload_activations=self.offload_activations,
        )


@dataclass
class EvalArguments:
    """Perplexity before and after pruning."""

    eval_data: str = field(
        default="wiki_offline", metadata={"help": "Evaluation text (test split of a name)."}
    )
    eval_seqlen: int = 512
    eval_windows: int | None = field(default=32, metadata={"help": "Max windows scored (None: all)."})
    eval_batch_size: int = 4
    skip_eval: bool = False


@dataclass
class OutputArguments:
    """Where results go."""

    save: str | None = field(default=None, metadata={"help": "Folder to save the pruned model into."})
    report_json: str | None = field(default=None, metadata={"help": "Write the pruning report as JSON here."})


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run_prune(argv: list[str]) -> int:
    """``prune``: load, (evaluate,) prune, (evaluate,) save. Returns the exit code."""
    parser = HfArgumentParser((ModelArguments, PruneArguments, EvalArguments, OutputArguments))
    parser.prog = "hf-hybrid-sparse prune"
    model_args, prune_args, eval_args, out_args = parser.parse_args_into_dataclasses(args=argv)
    config = prune_args.to_config()  # validates before anything is loaded

    from .engine import apply_hybrid_sparsity
    from .evaluation import perplexity
    from .models import load_model_and_tokenizer
    from .storage import save_pruned

    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    model, tokenizer = load_model_and_tokenizer(model_args.model, model_args.dtype, model_args.device_map)

    def ppl():
        return perplexity(
            model,
            tokenizer,
            eval_args.eval_data,
            seqlen=eval_args.eval_seqlen,
            max_windows=eval_args.eval_windows,
            batch_size=eval_args.eval_batch_size,
        )

    before = None if eval_args.skip_eval else ppl()
    if before is not None:
        _print(
            f"perplexity before: {before.perplexity:.3f} ({before.tokens} tokens, {eval_args.eval_data} test)"
        )
    report = apply_hybrid_sparsity(model, config, prune_args.calib, tokenizer=tokenizer)
    _print(report.to_markdown())
    after = None if eval_args.skip_eval else ppl()
    if after is not None:
        _print(
            f"perplexity after:  {after.perplexity:.3f} ({after.tokens} tokens, {eval_args.eval_data} test)"
        )
    result = report.to_dict()
    result["perplexity_before"] = None if before is None else before.perplexity
    result["perplexity_after"] = None if after is None else after.perplexity
    if out_args.report_json:
        with open(out_args.report_json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    if out_args.save:
        save_pruned(model, out_args.save, tokenizer=tokenizer, report=result)
        _print(f"saved to {out_args.save}")
    return 0


@dataclass
class FinetuneArguments:
    """Recovery fine-tuning of a pruned model (full, or LoRA with lora_r > 0)."""

    data: str = field(
        default="wiki_offline", metadata={"help": "Training text: a name or a .txt/.jsonl path."}
    )
    seqlen: int = 512
    max_samples: int | None = field(default=None, metadata={"help": "Max training windows."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 = full fine-tuning."})
    lora_alpha: int = 16
    lora_targets: str = field(default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    lora_mode: str = field(default="masked", metadata={"help": "masked (exact sparse merge) | remask"})
    eval_windows: int | None = 16
    final_dir: str | None = field(default=None, metadata={"help": "Where to save the final (merged) model."})


def run_finetune(argv: list[str]) -> int:
    """``finetune``: SparseTrainer on a pruned model, perplexity before/after, save with the sparsity state."""
    from transformers import TrainingArguments

    parser = HfArgumentParser((ModelArguments, FinetuneArguments, TrainingArguments))
    parser.prog = "hf-hybrid-sparse finetune"
    model_args, ft, targs = parser.parse_args_into_dataclasses(args=argv)
    if ft.lora_mode not in ("masked", "remask"):
        raise HybridSparseError(f"--lora_mode {ft.lora_mode!r}: choose masked or remask.")

    from .data import lm_dataset
    from .evaluation import perplexity
    from .lora import get_sparse_peft_model, merge_sparse_lora
    from .models import load_model_and_tokenizer
    from .storage import save_pruned
    from .trainer import SparseTrainer

    hf_logging.set_verbosity_info()
    model, tokenizer = load_model_and_tokenizer(model_args.model, model_args.dtype, model_args.device_map)
    train = lm_dataset(ft.data, tokenizer, ft.seqlen, ft.max_samples)

    def ppl(m) -> float:
        m.eval()
        return perplexity(m, tokenizer, ft.data, seqlen=ft.seqlen, max_windows=ft.eval_windows).perplexity

    before = ppl(model)
    _print(f"perplexity before: {before:.3f}")
    target = model
    if ft.lora_r > 0:
        from peft import LoraConfig

        lora = LoraConfig(
            r=ft.lora_r,
            lora_alpha=ft.lora_alpha,
            target_modules=ft.lora_targets.split(","),
            task_type="CAUSAL_LM",
        )
        target = get_sparse_peft_model(model, lora, mode=ft.lora_mode)
    trainer = SparseTrainer(model=target, args=targs, train_dataset=train)
    trainer.train()
    if ft.lora_r > 0:
        model, merge_report = merge_sparse_lora(target)
        _print(
            f"merged LoRA ({merge_report.mode}); largest share of an update removed by re-masking: "
            f"{merge_report.max_removed_fraction:.4f}"
        )
    after = ppl(model)
    _print(f"perplexity after:  {after:.3f}")
    final = ft.final_dir or f"{targs.output_dir}/final"
    save_pruned(
        model,
        final,
        tokenizer=tokenizer,
        report={"perplexity_before": before, "perplexity_after": after, "steps": trainer.state.global_step},
    )
    _print(f"saved to {final}")
    return 0


@dataclass
class EvalCommandArguments:
    """Evaluate a (pruned) model, optionally side by side with its dense original."""

    dense_model: str | None = field(default=None, metadata={"help": "Dense model to compare against."})
    perplexity: str = field(
        default="wiki_offline", metadata={"help": "Comma-separated: wikitext2, c4, wiki_offline."}
    )
    seqlen: int = 2048
    max_windows: int | None = None
    tasks: str | None = field(
        default=None, metadata={"help": "lm-eval tasks ('default' = the Wanda paper's seven)."}
    )
    squad: bool = False
    gsm8k: bool = False
    limit: int | None = field(default=None, metadata={"help": "Max examples per task."})
    batch_size: int = 4
    json_out: str | None = None


def _evaluate(model, tokenizer, args: EvalCommandArguments) -> dict[str, float]:
    from .evaluation import perplexity
    from .tasks import DEFAULT_LM_EVAL_TASKS, evaluate_gsm8k, evaluate_squad, zero_shot

    out: dict[str, float] = {}
    for name in [n.strip() for n in args.perplexity.split(",") if n.strip()]:
        res = perplexity(
            model,
            tokenizer,
            name,
            seqlen=args.seqlen,
            max_windows=args.max_windows,
            batch_size=args.batch_size,
        )
        out[f"ppl {name}"] = res.perplexity
        out[f"ppl {name} tokens"] = res.tokens
    if args.tasks:
        tasks = DEFAULT_LM_EVAL_TASKS if args.tasks == "default" else args.tasks.split(",")
        for task, acc in zero_shot(
            model, tokenizer, tasks, batch_size=args.batch_size, limit=args.limit
        ).items():
            out[f"{task} acc"] = acc
    if args.squad:
        res = evaluate_squad(model, tokenizer, max_samples=args.limit, batch_size=args.batch_size)
        out["squad EM"], out["squad F1"] = res["exact_match"], res["f1"]
    if args.gsm8k:
        out["gsm8k acc"] = evaluate_gsm8k(
            model, tokenizer, max_samples=args.limit, batch_size=args.batch_size
        )["accuracy"]
    return out


def run_eval(argv: list[str]) -> int:
    """``eval``: perplexity and task metrics, as JSON and a markdown table (dense vs pruned)."""
    parser = HfArgumentParser((ModelArguments, EvalCommandArguments))
    parser.prog = "hf-hybrid-sparse eval"
    model_args, args = parser.parse_args_into_dataclasses(args=argv)
    from .models import load_model_and_tokenizer

    columns = {}
    if args.dense_model:
        dense, tok = load_model_and_tokenizer(args.dense_model, model_args.dtype, model_args.device_map)
        columns["dense"] = _evaluate(dense, tok, args)
        del dense
    model, tok = load_model_and_tokenizer(model_args.model, model_args.dtype, model_args.device_map)
    columns[model_args.model] = _evaluate(model, tok, args)
    names = list(columns)
    _print("| metric | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for metric in columns[names[-1]]:
        cells = [columns[n].get(metric) for n in names]
        _print(
            f"| {metric} | "
            + " | ".join("" if c is None else f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells)
            + " |"
        )
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump(columns, fh, indent=2)
    return 0


@dataclass
class ProgressiveArguments:
    """Progressive DENSE -> NM -> TOPK pruning over a schedule, with fine-tuning between iterations."""

    schedule: str = field(
        default=None, metadata={"help": "CSV or YAML schedule (see examples/progressive.csv)."}
    )
    output: str = field(default=None, metadata={"help": "Run folder: one checkpoint per iteration."})
    resume: bool = field(
        default=False, metadata={"help": "Continue a run in --output after its last finished iteration."}
    )
    method: str = "wanda"
    tier_group: str = "layer"
    block_size: int = 16
    nm: str = "2:4"
    topk_per_block: int = 15
    calib: str = "wiki_offline"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 8
    finetune_steps: int = 0
    finetune_lr: float = 5e-5
    finetune_batch_size: int = 4
    finetune_seqlen: int = 512
    lora_r: int = 0
    eval_data: str = "wiki_offline"
    eval_seqlen: int = 512
    eval_windows: int | None = 16
    plot: str | None = field(
        default=None, metadata={"help": "Plot perplexity/sparsity per iteration here ([viz])."}
    )


def run_progressive_cmd(argv: list[str]) -> int:
    """``progressive``: run or resume a schedule and print the per-iteration summary."""
    parser = HfArgumentParser((ModelArguments, ProgressiveArguments))
    parser.prog = "hf-hybrid-sparse progressive"
    model_args, args = parser.parse_args_into_dataclasses(args=argv)
    if not args.schedule or not args.output:
        raise HybridSparseError("--schedule and --output are required.")
    from .models import load_model_and_tokenizer
    from .progressive import ProgressiveSettings, plot_progress, run_progressive, summary_markdown
    from .schedule import load_schedule

    schedule = load_schedule(args.schedule)  # validated before the model is loaded
    config = HybridSparseConfig(
        method=args.method,
        pattern="hybrid",
        tier_group=args.tier_group,
        block_size=args.block_size,
        nm=args.nm,
        topk_per_block=args.topk_per_block,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    hf_logging.set_verbosity_info()
    model, tokenizer = load_model_and_tokenizer(model_args.model, model_args.dtype, model_args.device_map)
    settings = ProgressiveSettings(
        config=config,
        calib=args.calib,
        train_seqlen=args.finetune_seqlen,
        finetune_steps=args.finetune_steps,
        learning_rate=args.finetune_lr,
        batch_size=args.finetune_batch_size,
        lora_r=args.lora_r,
        eval_data=args.eval_data,
        eval_seqlen=args.eval_seqlen,
        eval_windows=args.eval_windows,
        seed=args.seed,
    )
    summary = run_progressive(
        model, tokenizer, schedule, settings, args.output, resume=args.resume, model_id=model_args.model
    )
    _print(summary_markdown(summary))
    if args.plot:
        _print(f"plot written to {plot_progress(summary, args.plot)}")
    return 0


@dataclass
class ReportArguments:
    """Read a saved model's sparsity metadata (headers only; no weights are loaded)."""

    directory: str = field(metadata={"help": "Folder written by save_pretrained."})
    plot: str | None = field(
        default=None, metadata={"help": "Draw the tier maps into this PNG (needs [viz])."}
    )
    json: bool = field(default=False, metadata={"help": "Print JSON instead of a markdown table."})


def run_report(argv: list[str]) -> int:
    """``report DIR``: print the recipe and per-layer sparsity table of a saved model."""
    from .hub import plot_tier_maps, read_sparsity_summary

    parser = HfArgumentParser(ReportArguments)
    parser.prog = "hf-hybrid-sparse report"
    if argv and not argv[0].startswith("-"):
        argv = ["--directory", argv[0], *argv[1:]]
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    summary = read_sparsity_summary(args.directory)
    if args.json:
        out = {k: v for k, v in summary.items() if k != "tier_maps"}
        _print(json.dumps(out, indent=2))
    else:
        recipe = summary["recipe"]
        _print(
            f"recipe: method={recipe.get('method')} pattern={recipe.get('pattern')} tier_ratios={recipe.get('tier_ratios')}"
        )
        _print("| module | shape | sparsity | dense | nm | topk |\n|---|---|---:|---:|---:|---:|")
        for row in summary["layers"]:
            _print(
                f"| {row['name']} | {row['shape']} | {row['sparsity']:.2%} | {row['dense']} | {row['nm']} | {row['topk']} |"
            )
        t = summary["tier_totals"]
        _print(
            f"| **total** | | **{summary['overall_sparsity']:.2%}** | {t['dense']} | {t['nm']} | {t['topk']} |"
        )
    if args.plot:
        _print(f"tier maps drawn to {plot_tier_maps(args.directory, args.plot)}")
    return 0


COMMANDS = {
    "prune": run_prune,
    "eval": run_eval,
    "progressive": run_progressive_cmd,
    "finetune": run_finetune,
    "report": run_report,
    "bench": lambda argv: __import__("hf_hybrid_sparse.bench", fromlist=["main"]).main(argv),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-hybrid-sparse`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            sys.stderr.write(f"unknown command {argv[0]!r}\n")
        sys.stderr.write(f"usage: hf-hybrid-sparse {{{'|'.join(COMMANDS)}}} [--help]\n")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (HybridSparseError, ImportError, FileNotFoundError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
