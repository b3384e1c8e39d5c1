"""`HybridSparseHfQuantizer`: the transformers hook that saves and restores the sparsity state.

Registered for ``quant_method="hybrid_sparse"`` beside :class:`HybridSparseConfig`.

* Saving: ``model.save_pretrained`` asks the quantizer for the state dict and header metadata; it
  adds each pruned parameter's bit-packed mask and the tier maps + recipe (format in
  :mod:`.format`; the tensors from :mod:`.writer`). Weights stay ordinary tensors with zeros.
* Loading: ``from_pretrained`` builds the quantizer from ``config.json``; before the weights load it
  notes the checkpoint files (and tells transformers the mask tensors are expected extras), after
  they load it reads the header and masks, checks them against the weights, and puts a
  :class:`~hf_hybrid_sparse.state.ParamSparsity` on every pruned module (:mod:`.reader`).

Nothing is quantized: the weights keep their dtype and remain trainable (full fine-tuning and PEFT).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer

from ..config import QUANT_METHOD, HybridSparseConfig
from ..errors import StorageError
from ..kernels.linear import convert_to_hybrid_kernels
from .format import MASK_PREFIX, VALUES_PREFIX
from .reader import read_metadata, restore_state
from .saving import save_pretrained
from .writer import sparse_state_dict


class HybridSparseHfQuantizer(HfQuantizer):
    """Saves/restores masks, tier maps and the recipe of a pruned model (see module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: HybridSparseConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_files: list[str] | None = None
        self.compressed = False  # set for the duration of a save_pretrained(..., compressed=True)

    # -- loading ------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        self.checkpoint_files = list(checkpoint_files or [])
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
        ignore.add("^" + MASK_PREFIX.replace(".", r"\."))
        ignore.add("^" + VALUES_PREFIX.replace(".", r"\."))
        model._keys_to_ignore_on_load_unexpected = ignore
        # a compressed checkpoint has no dense tensor for pruned weights: they are rebuilt after loading
        doc = read_metadata([f for f in self.checkpoint_files if str(f).endswith(".safetensors")])
        if doc is not None:
            missing = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
            missing |= {
                "^" + re.escape(k) + "$" for k, e in doc["modules"].items() if e["values"] is not None
            }
            model._keys_to_ignore_on_load_missing = missing
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        files = [f for f in (self.checkpoint_files or []) if str(f).endswith(".safetensors")]
        if not files:
            raise StorageError(
                "config.json declares quant_method='hybrid_sparse' but no safetensors checkpoint was loaded; "
                "the sparsity state can only be restored from safetensors files."
            )
        restore_state(model, files)
        _wrap_save(model)
        if getattr(self.quantization_config, "use_kernels", False):
            convert_to_hybrid_kernels(model)
        return model

    # -- saving -------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model):
        return sparse_state_dict(model, self.quantization_config.to_dict(), compressed=self.compressed)

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # full fine-tuning of a pruned model is the point (SparseTrainer keeps the masks)
        return True


def _wrap_save(model: torch.nn.Module) -> None:
    """Make ``model.save_pretrained`` atomic (see :func:`.saving.save_pretrained`)."""
    if "save_pretrained" not in model.__dict__ and hasattr(type(model), "save_pretrained"):
        model.save_pretrained = functools.partial(save_pretrained, model)


def attach(model: torch.nn.Module, config: HybridSparseConfig) -> bool:
    """Make ``model`` carry ``config`` and this quantizer, so ``save_pretrained`` writes the sparsity state.

    Returns ``False`` (and changes nothing) when the model is already quantized by another method.
    """
    current = getattr(model, "hf_quantizer", None)
    if current is not None and not isinstance(current, HybridSparseHfQuantizer):
        return False
    if not hasattr(model, "config"):
        return False
    model.config.quantization_config = config
    model.hf_quantizer = HybridSparseHfQuantizer(config, pre_quantized=True)
    model.quantization_method = QUANT_METHOD
    _wrap_save(model)
    return True


def register() -> None:
    """Register the quantizer with transformers (idempotent)."""
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantizer

    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not HybridSparseHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(HybridSparseHfQuantizer)
