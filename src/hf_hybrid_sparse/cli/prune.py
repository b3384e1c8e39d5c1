"""``hf-hybrid-sparse prune``: load, evaluate, prune, evaluate, save."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from .arguments import CalibrationArguments, ModelArguments, RecipeArguments, preflight, recipe_from_args, say


@dataclass
class EvalArguments:
    """Perplexity before and after pruning."""

    eval_data: str = field(
        default="wiki_offline", metadata={"help": "Evaluation text (test split of a name)."}
    )
    eval_seqlen: int = field(default=512, metadata={"help": "Tokens per perplexity window."})
    eval_windows: int = field(
        default=32,
        metadata={"help": "Max windows scored (0: all; the whole offline test split is ~200k tokens)."},
    )
    eval_batch_size: int = field(default=4, metadata={"help": "Windows per forward."})
    skip_eval: bool = field(default=False, metadata={"help": "Do not measure perplexity."})


@dataclass
class OutputArguments:
    """Where results go."""

    save: str | None = field(default=None, metadata={"help": "Folder to save the pruned model into."})
    report_json: str | None = field(default=None, metadata={"help": "Write the pruning report as JSON here."})
    report_table: bool = field(
        default=False, metadata={"help": "Print the per-module table, not only the summary."}
    )


def build_parser() -> HfArgumentParser:
    """The argument parser of ``prune`` (``--help`` lists every flag with its default)."""
    parser = HfArgumentParser(
        (ModelArguments, RecipeArguments, CalibrationArguments, EvalArguments, OutputArguments)
    )
    parser.prog = "hf-hybrid-sparse prune"
    return parser


def run(argv: list[str]) -> int:
    """Parse ``argv``, prune, print the report and perplexities; returns the exit code."""
    parser = HfArgumentParser(
        (ModelArguments, RecipeArguments, CalibrationArguments, EvalArguments, OutputArguments)
    )
    parser.prog = "hf-hybrid-sparse prune"
    model_args, recipe_args, calib_args, eval_args, out_args = parser.parse_args_into_dataclasses(args=argv)
    config = recipe_from_args(recipe_args)  # validates before anything is loaded
    seqlens = (config.seqlen,) if eval_args.skip_eval else (config.seqlen, eval_args.eval_seqlen)
    preflight(model_args.model, seqlens, calib=calib_args.calib, save=out_args.save)

    from ..api import apply_hybrid_sparsity
    from ..checkpoint.saving import save_pruned
    from ..evaluation.perplexity import perplexity
    from ..models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_args.model, model_args.dtype, model_args.device_map)

    def ppl():
        return perplexity(
            model,
            tokenizer,
            eval_args.eval_data,
            seqlen=eval_args.eval_seqlen,
            max_windows=eval_args.eval_windows or None,
            batch_size=eval_args.eval_batch_size,
        )

    before = None if eval_args.skip_eval else ppl()
    if before is not None:
        say(f"perplexity before: {before.perplexity:.3f} ({before.protocol()})")
    report = apply_hybrid_sparsity(model, config, calib_args.calibration_set(), tokenizer=tokenizer)
    say(report.summary())
    if out_args.report_table:
        say(report.to_markdown())
    after = None if eval_args.skip_eval else ppl()
    if after is not None:
        say(f"perplexity after:  {after.perplexity:.3f} ({after.protocol()})")
    result = report.to_dict()
    result["perplexity_before"] = None if before is None else before.perplexity
    result["perplexity_after"] = None if after is None else after.perplexity
    if out_args.report_json:
        with open(out_args.report_json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    if out_args.save:
        save_pruned(model, out_args.save, tokenizer=tokenizer, report=result)
        say(f"saved to {out_args.save}")
    return 0
