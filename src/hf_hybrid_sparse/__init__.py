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

_LAZY = {
    "SparseTrainer": "trainer",
    "SparsityMaskCallback": "trainer",
    "SparsityError": "trainer",
    "get_sparse_peft_model": "lora",
    "merge_sparse_lora": "lora",
    "load_sparse_peft_model": "lora",
    "MaskedLoraVariant": "lora",
    "HybridSparseLinear": "linear",
    "convert_to_hybrid_kernels": "linear",
    "convert_to_dense": "linear",
}


def __getattr__(name: str):
    # the training pieces import transformers.Trainer and peft: load them on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register()
_register_quantizer()

__all__ = [
    "SparseTrainer",
    "SparsityMaskCallback",
    "SparsityError",
    "get_sparse_peft_model",
    "merge_sparse_lora",
    "load_sparse_peft_model",
    "MaskedLoraVariant",
    "HybridSparseLinear",
    "convert_to_hybrid_kernels",
    "convert_to_dense",
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
