"""`HybridSparseHfQuantizer`: the transformers hook that saves and restores the sparsity state.

Registered for ``quant_method="hybrid_sparse"`` beside :class:`HybridSparseConfig`.

* Saving: ``model.save_pretrained`` asks the quantizer for the state dict and header metadata; it
  adds each pruned parameter's bit-packed mask and the tier maps + recipe (format in :mod:`.format`;
  the tensors from :mod:`.writer`). Weights stay ordinary tensors with zeros.
* Loading a pruned checkpoint: before the weights load it notes the checkpoint files (and tells
  transformers the mask tensors are expected extras, and which compressed weights arrive as their kept
  values); after they load it reads the headers and masks, checks them against the weights, and puts a
  :class:`~hf_hybrid_sparse.state.ParamSparsity` on every pruned module (:mod:`.reader`).
* Loading a dense checkpoint with ``quantization_config=HybridSparseConfig(method="magnitude", ...)``
  prunes it on load (calibrated methods need data: they are refused with a pointer to
  ``apply_hybrid_sparsity``).

Nothing is quantized: the weights keep their dtype, remain trainable (full fine-tuning and PEFT) and
may change dtype (``.half()``, ``.to(torch.bfloat16)``), so the model is not marked ``is_quantized``.
``model.dequantize()`` returns the plain model: weights as they are, the sparsity state removed.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer

from ..config import QUANT_METHOD, HybridSparseConfig
from ..engine.sequential import prune_model
from ..errors import ConfigError, ModelStructureError, StorageError
from ..kernels.linear import HybridSparseLinear, convert_to_dense, convert_to_hybrid_kernels
from ..state import clear_state
from . import packed_load
from .format import MASK_PREFIX
from .reader import Checkpoint, restore_state
from .saving import PENDING_FILE, save_pretrained
from .writer import sparse_state_dict


def _safetensors(files) -> list[str]:
    return [str(f) for f in (files or []) if str(f).endswith(".safetensors")]


class HybridSparseHfQuantizer(HfQuantizer):
    """Saves/restores masks, tier maps and the recipe of a pruned model (see module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: HybridSparseConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_files: list[str] | None = None
        self.compressed = False  # set for the duration of a save_pretrained(..., compressed=True)
        self.compressed_keys: set[str] = set()  # parameters a compressed checkpoint stores as kept values
        self.packed_keys: set[str] = set()  # layers packed while loading (use_kernels)
        self.open_checkpoint: Checkpoint | None = None

    # -- loading ------------------------------------------------------------------------------
    def validate_environment(self, *args, **kwargs) -> None:
        if not self.pre_quantized and self.quantization_config.method != "magnitude":
            raise ConfigError(
                f"from_pretrained can prune a dense checkpoint on load only with method='magnitude' (no data); "
                f"method={self.quantization_config.method!r} needs calibration: load the model, then call "
                "hf_hybrid_sparse.apply_hybrid_sparsity(model, config, calib_dataset, tokenizer)."
            )

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        # the kept values of a compressed weight arrive 1-D: transformers must take them, not call it a mismatch
        return param_name in self.compressed_keys

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        self.checkpoint_files = list(checkpoint_files or [])
        ignore = getattr(model, "_keys_to_ignore_on_load_unexpected", None)
        pattern = "^" + re.escape(MASK_PREFIX)
        # the type transformers expects: a set since it normalises to one (post_init), a list before
        if isinstance(ignore, set):
            ignore.add(pattern)
        else:
            ignore = list(ignore or [])
            model._keys_to_ignore_on_load_unexpected = ignore + ([pattern] if pattern not in ignore else [])
        files = _safetensors(self.checkpoint_files)
        if files and (Path(files[0]).parent / PENDING_FILE).exists():
            raise StorageError(
                f"{Path(files[0]).parent} holds an interrupted save (a {PENDING_FILE} file); complete it with "
                "hf_hybrid_sparse.checkpoint.recover(folder) or save the model again."
            )
        if self.pre_quantized and files:
            # parsed once, open until the weights are in (packing on load reads masks as weights arrive)
            self.open_checkpoint = ckpt = Checkpoint(files)
            if ckpt.doc is not None:
                self.compressed_keys = {k for k, e in ckpt.doc["modules"].items() if e["values"] is not None}
                if getattr(self.quantization_config, "use_kernels", False):
                    self.packed_keys = packed_load.install(model, ckpt)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        _unmark_quantized(model)
        if not self.pre_quantized:
            # a dense checkpoint pruned on load: magnitude needs no data
            prune_model(model, self.quantization_config)
        else:
            files = _safetensors(self.checkpoint_files)
            if not files:
                raise StorageError(
                    "config.json declares quant_method='hybrid_sparse' but no safetensors checkpoint was loaded; "
                    "the sparsity state can only be restored from safetensors files."
                )
            try:
                packed_load.finish(model)
                restore_state(model, files, skip=self.packed_keys, ckpt=self.open_checkpoint)
            finally:
                if self.open_checkpoint is not None:
                    self.open_checkpoint.__exit__(None, None, None)
                    self.open_checkpoint = None
        _wrap_save(model)
        if getattr(self.quantization_config, "use_kernels", False):
            convert_to_hybrid_kernels(model)  # layers packing could not take on load (e.g. pruned on load)
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
        # full fine-tuning of a pruned model is the point (the model keeps its own masks)
        return True

    # -- dequantize ---------------------------------------------------------------------------
    def _dequantize(self, model, dtype=None):
        if any(isinstance(m, HybridSparseLinear) for m in model.modules()):
            convert_to_dense(model)
        clear_state(model)
        model.__dict__.pop("save_pretrained", None)
        if isinstance(dtype, torch.dtype):
            model.to(dtype)
        return model


def _unmark_quantized(model: torch.nn.Module) -> None:
    """A pruned model is not quantized: dtype casts, ``.half()`` and training work as on any model."""
    from transformers import PreTrainedModel

    model.is_quantized = False
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and "_is_quantized" in module.config.__dict__:
            del module.config._is_quantized


def _wrap_save(model: torch.nn.Module) -> None:
    """Make ``model.save_pretrained`` atomic (see :func:`.saving.save_pretrained`)."""
    if "save_pretrained" not in model.__dict__ and hasattr(type(model), "save_pretrained"):
        model.save_pretrained = functools.partial(save_pretrained, model)


def release_dequantized_gguf(model: torch.nn.Module) -> None:
    """Drop the GGUF quantizer of a model whose GGUF weights were dequantised on load.

    Such a model holds plain floating-point ``nn.Linear`` weights; the GGUF quantizer left on it would
    only refuse ``save_pretrained``. Weights still packed in GGUF blocks cannot be pruned: refused
    with the fix, before any work.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    qconfig = getattr(quantizer, "quantization_config", None)
    if quantizer is None or getattr(qconfig, "quant_method", None) != "gguf":
        return
    if getattr(quantizer, "packed_modules", None):
        raise ModelStructureError(
            "The model keeps its GGUF weights packed, which cannot be pruned; load it dequantised: "
            "from_pretrained(..., gguf_file=..., quantization_config=GgufConfig(dequantize=True)) "
            "or hf_hybrid_sparse.load_model_and_tokenizer(path_to_gguf)."
        )
    quantizer.remove_quantization_config(model)
    if getattr(model, "hf_quantizer", None) is quantizer:
        model.hf_quantizer = None


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
