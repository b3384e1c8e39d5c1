"""hf-hybrid-sparse: Wanda-family pruning of Hugging Face causal LMs into hybrid block sparsity."""

from .config import HybridSparseConfig, register
from .engine import apply_hybrid_sparsity, sparsity_masks, tier_maps
from .errors import (
    CalibrationError,
    ConfigError,
    HybridSparseError,
    ModelStructureError,
    PruningError,
    TierMapError,
)
from .evaluation import perplexity
from .patterns import DENSE, NM, TOPK
from .report import SparsityReport
from .state import ParamSparsity, get_state, iter_sparse_params

__version__ = "0.1.0"

register()

__all__ = [
    "HybridSparseConfig",
    "apply_hybrid_sparsity",
    "sparsity_masks",
    "tier_maps",
    "perplexity",
    "SparsityReport",
    "ParamSparsity",
    "get_state",
    "iter_sparse_params",
    "DENSE",
    "NM",
    "TOPK",
    "HybridSparseError",
    "ConfigError",
    "ModelStructureError",
    "CalibrationError",
    "TierMapError",
    "PruningError",
]
