"""hf-hybrid-sparse: Wanda-family pruning of Hugging Face causal LMs into hybrid block sparsity.

The flow (see ARCHITECTURE.md): a :class:`HybridSparseConfig` recipe -> the engine prunes the model
block by block -> every pruned parameter carries its mask and tier map (:mod:`.state`) -> training,
checkpoint and kernels read that state.
"""

from .api import apply_hybrid_sparsity
from .checkpoint.quantizer import HybridSparseHfQuantizer
from .checkpoint.quantizer import register as _register_quantizer
from .checkpoint.saving import save_pretrained
from .config import HybridSparseConfig, register
from .data.calibration import CalibrationSet
from .engine.report import SparsityReport
from .errors import (
    CalibrationError,
    ConfigError,
    HybridSparseError,
    ModelStructureError,
    PackingError,
    PruningError,
    ScheduleError,
    SparsityError,
    StorageError,
    TierMapError,
)
from .evaluation.perplexity import perplexity
from .models import load_model_and_tokenizer
from .pruning.patterns import DENSE, NM, TOPK
from .state import (
    ParamSparsity,
    apply_masks,
    get_state,
    iter_sparse_params,
    revived_weights,
    sparsity_masks,
    tier_maps,
)
from .training import peft_patch as _peft_patch
from .version import __version__

_LAZY = {
    "SparseTrainer": "training.trainer",
    "SparsityMaskCallback": "training.trainer",
    "DistillationConfig": "training.distill",
    "dense_teacher": "training.distill",
    "get_sparse_peft_model": "training.lora",
    "merge_sparse_lora": "training.lora",
    "load_sparse_peft_model": "training.lora",
    "MaskedLoraVariant": "training.lora",
    "HybridSparseLinear": "kernels.linear",
    "convert_to_hybrid_kernels": "kernels.linear",
    "convert_to_dense": "kernels.linear",
}


def __getattr__(name: str):
    # the training pieces import transformers.Trainer and peft: load them on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register()
_register_quantizer()
_peft_patch.install()

__all__ = [
    "__version__",
    "SparseTrainer",
    "SparsityMaskCallback",
    "DistillationConfig",
    "dense_teacher",
    "get_sparse_peft_model",
    "merge_sparse_lora",
    "load_sparse_peft_model",
    "MaskedLoraVariant",
    "HybridSparseLinear",
    "convert_to_hybrid_kernels",
    "convert_to_dense",
    "HybridSparseConfig",
    "HybridSparseHfQuantizer",
    "save_pretrained",
    "apply_hybrid_sparsity",
    "sparsity_masks",
    "tier_maps",
    "perplexity",
    "SparsityReport",
    "ParamSparsity",
    "get_state",
    "iter_sparse_params",
    "apply_masks",
    "revived_weights",
    "DENSE",
    "NM",
    "TOPK",
    "HybridSparseError",
    "ConfigError",
    "ModelStructureError",
    "CalibrationError",
    "CalibrationSet",
    "load_model_and_tokenizer",
    "TierMapError",
    "PruningError",
    "StorageError",
    "SparsityError",
    "PackingError",
    "ScheduleError",
]
