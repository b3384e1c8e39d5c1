"""``hf-hybrid-sparse report DIR``: a saved model's recipe and per-layer sparsity, from its headers alone."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from .arguments import say


@dataclass
class ReportArguments:
    """Read a saved model's sparsity metadata (headers only; no weights are loaded)."""

    directory: str | None = field(
        default=None, metadata={"help": "Folder written by save_pretrained (or give it first, positionally)."}
    )
    plot: str | None = field(
        default=None, metadata={"help": "Draw the tier maps into this PNG (needs [viz])."}
    )
    json: bool = field(default=False, metadata={"help": "Print JSON instead of text."})
    table: bool = field(
        default=False, metadata={"help": "Also print the per-module table after the summary."}
    )


def run(argv: list[str]) -> int:
    """Parse ``argv`` (``DIR`` may come first, without ``--directory``) and print the table or JSON."""
    from ..checkpoint.reader import read_sparsity_summary
    from ..engine.report import tier_shares
    from ..viz import plot_tier_maps

    parser = HfArgumentParser(ReportArguments)
    parser.prog = "hf-hybrid-sparse report"
    parser.add_argument("folder", nargs="?", default=None, help="Folder written by save_pretrained.")
    args, extra = parser.parse_args_into_dataclasses(args=argv)
    args.directory = args.directory or extra.folder
    if not args.directory:
        parser.error("give the saved model's folder: hf-hybrid-sparse report FOLDER")
    summary = read_sparsity_summary(args.directory)
    if args.json:
        out = {k: v for k, v in summary.items() if k != "tier_maps"}
        say(json.dumps(out, indent=2))
    else:
        recipe = summary["recipe"]
        t = summary["tier_totals"]
        say(
            f"{args.directory}: {recipe.get('method')} / {recipe.get('pattern')}, {len(summary['layers'])} pruned "
            f"weights, sparsity {summary['overall_sparsity']:.2%}"
            + (f", tier_ratios {recipe.get('tier_ratios')}" if recipe.get("pattern") == "hybrid" else "")
        )
        blocks = tier_shares(t)
        if blocks:
            say(blocks)
        if args.table:
            say("| module | shape | sparsity | dense | nm | topk |\n|---|---|---:|---:|---:|---:|")
            for row in summary["layers"]:
                say(
                    f"| {row['name']} | {row['shape']} | {row['sparsity']:.2%} | {row['dense']} | {row['nm']} | "
                    f"{row['topk']} |"
                )
            say(
                f"| **total** | | **{summary['overall_sparsity']:.2%}** | {t['dense']} | {t['nm']} | {t['topk']} |"
            )
        else:
            say("(--table prints the per-module table)")
    if args.plot:
        pages = plot_tier_maps(summary["tier_maps"], args.plot)
        say(f"tier maps of {len(summary['tier_maps'])} modules drawn to {', '.join(map(str, pages))}")
    return 0
