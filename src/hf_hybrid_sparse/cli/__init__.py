"""Command line: ``hf-hybrid-sparse prune | eval | progressive | finetune | report | bench``."""

from .dispatch import COMMANDS, main

__all__ = ["COMMANDS", "main"]
