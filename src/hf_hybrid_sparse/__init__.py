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
from .quantizer import HybridSparseHfQuantizer
from .quantizer import register as _register_quantizer
from .report import SparsityReport
from .serialization import StorageError
from .state import ParamSparsity, get_state, iter_sparse_params
from .storage import save_pretrained

__version__ = "0.1.0"

register()
_register_quantizer()

__all__ = [
    "HybridSparseConfig",
    "HybridSparseHfQuantizer",
    "StorageError",
    "save_pretrained",
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
