"""The architecture-agnostic engine: find the decoder blocks, capture their inputs, prune block by block."""

from .report import ModuleReport, SparsityReport
from .sequential import prune_model

__all__ = ["prune_model", "SparsityReport", "ModuleReport"]
