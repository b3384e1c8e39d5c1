"""``hf-hybrid-sparse report DIR``: a saved model's recipe and per-layer sparsity, from its headers alone."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from .arguments import say


@dataclass
class ReportArguments:
    """Read a saved model's sparsity metadata (headers only; no weights are loaded)."""

    directory: str = field(metadata={"help": "Folder written by save_pretrained."})
    plot: str | None = field(
        default=None, metadata={"help": "Draw the tier maps into this PNG (needs [viz])."}
    )
    json: bool = field(default=False, metadata={"help": "Print JSON instead of a markdown table."})


def run(argv: list[str]) -> int:
    """Parse ``argv`` (``DIR`` may come first, without ``--directory``) and print the table or JSON."""
    from ..checkpoint.reader import read_sparsity_summary
    from ..viz import plot_tier_maps

    parser = HfArgumentParser(ReportArguments)
    parser.prog = "hf-hybrid-sparse report"
    if argv and not argv[0].startswith("-"):
        argv = ["--directory", argv[0], *argv[1:]]
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    summary = read_sparsity_summary(args.directory)
    if args.json:
        out = {k: v for k, v in summary.items() if k != "tier_maps"}
        say(json.dumps(out, indent=2))
    else:
        recipe = summary["recipe"]
        say(
            f"recipe: method={recipe.get('method')} pattern={recipe.get('pattern')} "
            f"tier_ratios={recipe.get('tier_ratios')}"
        )
        say("| module | shape | sparsity | dense | nm | topk |\n|---|---|---:|---:|---:|---:|")
        for row in summary["layers"]:
            say(
                f"| {row['name']} | {row['shape']} | {row['sparsity']:.2%} | {row['dense']} | {row['nm']} | "
                f"{row['topk']} |"
            )
        t = summary["tier_totals"]
        say(
            f"| **total** | | **{summary['overall_sparsity']:.2%}** | {t['dense']} | {t['nm']} | {t['topk']} |"
        )
    if args.plot:
        say(f"tier maps drawn to {plot_tier_maps(summary['tier_maps'], args.plot)}")
    return 0
