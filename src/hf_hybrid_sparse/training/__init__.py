"""Keeping the sparsity through training: the mask guards, sparse LoRA, progressive pruning with fine-tuning."""

from .lora import MaskedLoraVariant, get_sparse_peft_model, load_sparse_peft_model, merge_sparse_lora
from .trainer import SparseTrainer, SparsityMaskCallback

__all__ = [
    "SparseTrainer",
    "SparsityMaskCallback",
    "MaskedLoraVariant",
    "get_sparse_peft_model",
    "load_sparse_peft_model",
    "merge_sparse_lora",
]
