"""``hf-hybrid-sparse progressive``: run or resume a schedule, fine-tuning between iterations.

Takes every recipe flag (``--method``, ``--dampening``, ``--ignore``, ...); the schedule gives each
iteration's tier ratios (and ``topk_per_block`` where it has that column), so ``--tier_ratios`` is refused
and ``--pattern`` must be ``hybrid``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import HfArgumentParser

from ..errors import HybridSparseError
from .arguments import (
    CalibrationArguments,
    DistillationArguments,
    ModelArguments,
    RecipeArguments,
    preflight,
    recipe_from_args,
    say,
)


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
    finetune_steps: int = field(default=0, metadata={"help": "Fine-tuning steps after each iteration."})
    finetune_lr: float = field(default=5e-5, metadata={"help": "Fine-tuning learning rate."})
    finetune_batch_size: int = field(default=4, metadata={"help": "Fine-tuning windows per step."})
    finetune_seqlen: int = field(default=512, metadata={"help": "Tokens per fine-tuning window."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank for fine-tuning; 0 = full fine-tuning."})
    eval_data: str = field(default="wiki_offline", metadata={"help": "Perplexity text (its test split)."})
    eval_seqlen: int = field(default=512, metadata={"help": "Tokens per perplexity window."})
    eval_windows: int | None = field(default=16, metadata={"help": "Perplexity windows per iteration."})
    plot: str | None = field(
        default=None, metadata={"help": "Plot perplexity/sparsity per iteration here ([viz])."}
    )


def build_parser() -> HfArgumentParser:
    """The argument parser of ``progressive`` (``--help`` lists every flag with its default)."""
    parser = HfArgumentParser(
        (ModelArguments, RecipeArguments, CalibrationArguments, ProgressiveArguments, DistillationArguments)
    )
    parser.prog = "hf-hybrid-sparse progressive"
    return parser


def run(argv: list[str]) -> int:
    """Parse ``argv``, run or resume the schedule, print the per-iteration summary."""
    parser = build_parser()
    model_args, recipe_args, calib_args, args, distill_args = parser.parse_args_into_dataclasses(args=argv)
    if not args.schedule or not args.output:
        raise HybridSparseError("--schedule and --output are required.")
    if any(a.split("=")[0] in ("--tier_ratios", "--tier-ratios") for a in argv):
        raise HybridSparseError(
            "progressive takes the tier ratios of each iteration from --schedule, not --tier_ratios."
        )
    if recipe_args.pattern != "hybrid":
        raise HybridSparseError(
            f"progressive prunes into hybrid tiers; --pattern {recipe_args.pattern!r} is not 'hybrid'."
        )
    config = recipe_from_args(recipe_args)
    distillation = distill_args.distillation_config()
    if distillation is not None and args.finetune_steps <= 0:
        raise HybridSparseError("--distill needs fine-tuning: set --finetune_steps (per iteration).")
    if distill_args.teacher:
        raise HybridSparseError("progressive distils from the dense model it starts from; drop --teacher.")
    preflight(
        model_args.model, (config.seqlen, args.eval_seqlen, args.finetune_seqlen), calib=calib_args.calib
    )

    from ..models import load_model_and_tokenizer
    from ..training.progressive import ProgressiveSettings, dense_baseline, run_progressive, summary_markdown
    from ..training.schedule import load_schedule
    from ..viz import plot_progress

    schedule = load_schedule(args.schedule)  # validated before the model is loaded
    model, tokenizer = load_model_and_tokenizer(model_args.model, model_args.dtype, model_args.device_map)
    settings = ProgressiveSettings(
        config=config,
        calib=calib_args.calibration_set(),
        train_seqlen=args.finetune_seqlen,
        finetune_steps=args.finetune_steps,
        learning_rate=args.finetune_lr,
        batch_size=args.finetune_batch_size,
        lora_r=args.lora_r,
        eval_data=args.eval_data,
        eval_seqlen=args.eval_seqlen,
        eval_windows=args.eval_windows,
        seed=config.seed,
        distillation=distillation,
    )
    summary = run_progressive(
        model, tokenizer, schedule, settings, args.output, resume=args.resume, model_id=model_args.model
    )
    dense = dense_baseline(args.output)
    say(summary_markdown(summary, dense))
    if args.plot:
        say(f"plot written to {plot_progress(summary, args.plot, dense=dense)}")
    return 0
