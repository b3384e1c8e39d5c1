"""The ``hf-hybrid-sparse`` console script: one module per command in this folder."""

from __future__ import annotations

import importlib
import sys

from ..errors import HybridSparseError

#: command -> module of this package with ``run(argv) -> int``
COMMANDS = {
    "prune": "prune",
    "eval": "evaluate",
    "progressive": "progressive",
    "finetune": "finetune",
    "report": "report",
    "bench": "bench",
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
        run = importlib.import_module(f".{COMMANDS[argv[0]]}", __package__).run
        return run(argv[1:])
    except (HybridSparseError, ImportError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
