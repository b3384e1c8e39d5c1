"""Keeping the sparsity through training: the mask guards, sparse LoRA, progressive pruning with fine-tuning.

Names load on first use: the trainer pulls in ``transformers.Trainer`` and LoRA pulls in peft.
"""

import importlib

_NAMES = {
    "SparseTrainer": "trainer",
    "SparsityMaskCallback": "trainer",
    "DistillationConfig": "distill",
    "dense_teacher": "distill",
    "MaskedLoraVariant": "lora",
    "RemaskLoraVariant": "lora",
    "get_sparse_peft_model": "lora",
    "load_sparse_peft_model": "lora",
    "merge_sparse_lora": "lora",
}


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_NAMES)
