"""Sparsity-preserving LoRA with ``peft``, whichever route creates the adapters.

Every LoRA adapter that peft puts on a pruned layer -- through :func:`get_sparse_peft_model`, a plain
``peft.get_peft_model``, ``PeftModel.from_pretrained`` or TRL's ``SFTTrainer(peft_config=...)`` --
gets one of two variants (installed by :mod:`.peft_patch` when peft builds the layer):

* ``"masked"`` (default): :class:`MaskedLoraVariant`, whose update is ``(B @ A * scaling) * mask``: only
  kept weights change, training sees exactly the function that will be merged, and any merge
  (``merge_and_unload``, ``merge_adapter``) is exact: the merged model has precisely the pruned model's
  sparsity.
* ``"remask"``: :class:`RemaskLoraVariant`, vanilla LoRA in the forward pass; merging adds only the
  kept part of ``B @ A`` (the masks are re-applied) and logs the share of each update that dropped.
  :func:`merge_sparse_lora` returns that share per layer.

DoRA and other peft variants cannot keep a pruned layer sparse when merged; asking for one on a pruned
layer raises :class:`~hf_hybrid_sparse.SparsityError` naming the layer.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from ..errors import HybridSparseError, SparsityError
from ..logs import get_logger
from ..state import apply_masks, get_state, iter_sparse_params

logger = get_logger(__name__)

MODES = ("masked", "remask")
_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("hf_hybrid_sparse_lora_mode", default="masked")


@contextlib.contextmanager
def lora_mode(mode: str) -> Iterator[None]:
    """Adapters that peft creates inside the context on pruned layers use ``mode`` (``masked`` or ``remask``)."""
    if mode not in MODES:
        raise HybridSparseError(f"mode={mode!r}; choose 'masked' (exact sparse merge) or 'remask'.")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def _base_mask(module) -> torch.Tensor | None:
    state = get_state(module.get_base_layer()).get("weight")
    return None if state is None else state.mask


def _masked_delta(module, adapter: str) -> torch.Tensor:
    delta = module.get_delta_weight(adapter)  # in the base weight's own layout (fan_in_fan_out handled)
    mask = _base_mask(module)
    return delta * mask.to(device=delta.device, dtype=delta.dtype)


class _SparseMerge(LoraVariant):
    """Merging adds only the kept part of the update, so the merged weight keeps the pruned zeros."""

    @staticmethod
    def init(module, *args, **kwargs) -> None:
        if _base_mask(module) is None:
            raise HybridSparseError(
                "a sparse LoRA variant needs a pruned base layer (it has no sparsity state)."
            )

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + _masked_delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += _masked_delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - _masked_delta(module, active_adapter).to(orig_weight.dtype)


class MaskedLoraVariant(_SparseMerge):
    """LoRA whose update is restricted to the kept weights of the pruned base weight."""

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        x = module.lora_dropout[active_adapter](x)
        delta = _masked_delta(module, active_adapter).to(x.dtype)
        if getattr(module, "fan_in_fan_out", False):
            return result + (x @ delta).to(result.dtype)
        return result + nn.functional.linear(x, delta).to(result.dtype)


class RemaskLoraVariant(_SparseMerge):
    """Vanilla LoRA in the forward pass; merging re-applies the masks and logs the share of the update dropped."""

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        x = module._cast_input_dtype(x, lora_a.weight.dtype) if hasattr(module, "_cast_input_dtype") else x
        out = lora_b(lora_a(module.lora_dropout[active_adapter](x))) * module.scaling[active_adapter]
        return result + out.to(result.dtype)

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        _log_removed(module, active_adapter)
        return _SparseMerge.merge_safe(module, active_adapter, orig_weight)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        _log_removed(module, active_adapter)
        _SparseMerge.merge_unsafe(module, active_adapter, orig_weight)


def removed_fraction(module, adapter: str) -> float:
    """Share of the Frobenius norm of an adapter's update that the masks remove (0 for masked adapters)."""
    if isinstance(module.lora_variant.get(adapter), MaskedLoraVariant):
        return 0.0
    with torch.no_grad():
        delta = module.get_delta_weight(adapter).float()
    total = float(delta.norm()) or 1.0
    return float((delta * ~_base_mask(module).to(delta.device)).norm()) / total


def _log_removed(module, adapter: str) -> None:
    logger.info(
        f"re-masking a LoRA merge removed {removed_fraction(module, adapter):.2%} of the update's norm"
    )


def variant_for(module, requested: Any) -> Any:
    """The variant peft should use for ``module`` given the one it would pick (called by :mod:`.peft_patch`)."""
    if _base_mask(module) is None:
        return requested
    if requested is not None:
        raise SparsityError(
            f"{type(requested).__name__} on a pruned {type(module.get_base_layer()).__name__}: merging it would "
            "revive pruned weights. Use plain LoRA on pruned layers (hf-hybrid-sparse makes it mask-aware)."
        )
    return MaskedLoraVariant() if _MODE.get() == "masked" else RemaskLoraVariant()


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def get_sparse_peft_model(
    model: nn.Module, lora_config: Any, mode: str = "masked", adapter_name: str = "default"
):
    """``peft.get_peft_model`` for a pruned model, with the adapters of pruned layers in ``mode``.

    Raises :class:`HybridSparseError` before wrapping when the model is not pruned, ``mode`` is unknown, or
    an adapter would sit on a pruned layer that the chosen mode cannot keep sparse.
    """
    from peft import get_peft_model

    if mode not in MODES:
        raise HybridSparseError(f"mode={mode!r}; choose 'masked' (exact sparse merge) or 'remask'.")
    if not any(True for _ in iter_sparse_params(model)):
        raise HybridSparseError(
            "The model has no sparsity state; prune it (apply_hybrid_sparsity) before adding LoRA."
        )
    with lora_mode(mode):
        peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)
    _check_supported(peft_model)
    return peft_model


def _check_supported(peft_model) -> None:
    from peft.tuners.lora import Linear as LoraLinear

    for name, module in _lora_layers(peft_model):
        if _base_mask(module) is not None and not isinstance(module, LoraLinear):
            raise HybridSparseError(
                f"{name}: sparse LoRA supports linear layers only, not {type(module).__name__}; "
                "remove it from target_modules."
            )


def load_sparse_peft_model(model: nn.Module, adapter_path: str, mode: str = "masked", **kwargs: Any):
    """``PeftModel.from_pretrained`` for a pruned base model, the adapters of pruned layers in ``mode``.

    Saved adapters hold only the LoRA weights; the masks come from the base model (e.g. loaded with
    ``from_pretrained`` from a hybrid-sparse checkpoint), so reload the base first.
    """
    from peft import PeftModel

    if not any(True for _ in iter_sparse_params(model)):
        raise HybridSparseError("The base model has no sparsity state; load the pruned checkpoint first.")
    with lora_mode(mode):
        peft_model = PeftModel.from_pretrained(model, adapter_path, **kwargs)
    _check_supported(peft_model)
    return peft_model


@dataclass
class MergeReport:
    """What merging changed, per pruned layer with an adapter."""

    mode: str
    layers: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def max_removed_fraction(self) -> float:
        """Largest share of an update's Frobenius norm that re-masking removed (0 for masked adapters)."""
        return max((v["removed_fraction"] for v in self.layers.values()), default=0.0)

    def to_markdown(self) -> str:
        lines = ["| layer | removed share of update norm |", "|---|---:|"]
        lines += [f"| {k} | {v['removed_fraction']:.4f} |" for k, v in self.layers.items()]
        return "\n".join(lines)


@torch.no_grad()
def merge_sparse_lora(peft_model: Any) -> tuple[nn.Module, MergeReport]:
    """Merge the adapters into the base weights keeping the sparsity; returns ``(model, report)``.

    Masked adapters merge exactly. Remask adapters are merged with the masks re-applied; the report gives,
    per layer, the share of the update's norm that the re-masking removed.
    """
    report = MergeReport(mode="masked")
    for name, module in _lora_layers(peft_model):
        if _base_mask(module) is None:
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if not isinstance(module.lora_variant.get(adapter), MaskedLoraVariant):
                report.mode = "remask"
            report.layers[f"{name}[{adapter}]"] = {"removed_fraction": removed_fraction(module, adapter)}
    merged = peft_model.merge_and_unload()
    # adapters made without a sparse variant (created before this package was imported) merged densely
    apply_masks(merged)
    if report.mode == "remask":
        logger.info(
            f"Re-masking after the merge removed up to {report.max_removed_fraction:.2%} of an update's norm."
        )
    return merged, report
