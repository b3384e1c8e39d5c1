"""The ``hf-hybrid-sparse`` console script: one module per command in this folder."""

from __future__ import annotations

import importlib
import sys

from ..errors import HybridSparseError

#: command -> (module of this package with ``run(argv) -> int``, one-line description)
COMMANDS = {
    "prune": (
        "prune",
        "prune a model (default: the embedded SmolLM2 on the offline corpus), print perplexity, save",
    ),
    "eval": ("evaluate", "perplexity and task metrics of a model, optionally beside its dense original"),
    "progressive": ("progressive", "prune in steps along a schedule, fine-tuning between steps (resumable)"),
    "finetune": ("finetune", "fine-tune a pruned model (full or LoRA) keeping its sparsity, then save"),
    "report": ("report", "a saved model's recipe and per-layer sparsity, from its file headers alone"),
    "bench": ("bench", "packed-format size and kernel timing summary (benchmarks/ has the full scripts)"),
}

VERBOSE_FLAG = "--verbose"


def usage() -> str:
    """The top-level help text."""
    width = max(map(len, COMMANDS))
    lines = [
        "usage: hf-hybrid-sparse COMMAND [flags] [--verbose]",
        "",
        "Wanda-family pruning of Hugging Face causal LMs into hybrid dense / N:M / top-K block sparsity.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()),
        "",
        "`hf-hybrid-sparse COMMAND --help` lists the command's flags with their defaults.",
        f"{VERBOSE_FLAG}: also show transformers' INFO logs (config dumps, loading details); by default only",
        "warnings, the package's own progress lines and the results are printed.",
    ]
    return "\n".join(lines) + "\n"


def set_verbosity(verbose: bool) -> None:
    """Quiet transformers unless ``verbose``; the package's own INFO lines and progress bars stay on."""
    import logging

    from transformers.utils import logging as hf_logging

    from ..logs import ROOT

    if verbose:
        hf_logging.set_verbosity_info()
    else:
        hf_logging.set_verbosity_warning()
    logging.getLogger(ROOT).setLevel(logging.INFO)
    hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-hybrid-sparse`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = VERBOSE_FLAG in argv
    argv = [a for a in argv if a != VERBOSE_FLAG]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            sys.stderr.write(f"unknown command {argv[0]!r}\n\n")
            sys.stderr.write(usage())
            return 2
        sys.stdout.write(usage())
        return 0 if argv else 2
    try:
        set_verbosity(verbose)
        run = importlib.import_module(f".{COMMANDS[argv[0]][0]}", __package__).run
        return run(argv[1:])
    except (HybridSparseError, ImportError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
