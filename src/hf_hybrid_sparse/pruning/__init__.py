"""Pruning math on single weight matrices: scores, patterns and tier maps, SparseGPT. Pure tensor code, no model."""

from .matrix import MatrixResult, check_previous_tiers, prune_matrix, shape_problem
from .patterns import DENSE, NM, TIER_NAMES, TOPK
from .scoring import InputStats

__all__ = [
    "DENSE",
    "NM",
    "TOPK",
    "TIER_NAMES",
    "InputStats",
    "MatrixResult",
    "prune_matrix",
    "shape_problem",
    "check_previous_tiers",
]
