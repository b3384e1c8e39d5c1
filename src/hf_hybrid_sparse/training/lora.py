"""Sparsity-preserving LoRA with ``peft``.

Two ways to keep a pruned model sparse through LoRA:

* ``mode="masked"`` (default): a mask-aware adapter. Its update is ``(B @ A * scaling) * mask``, so
  only kept weights change, training sees exactly the function that will be merged, and
  ``merge_and_unload`` is exact: the merged model has precisely the pruned model's sparsity.
* ``mode="remask"``: vanilla LoRA; merging adds the dense ``B @ A`` and then re-applies the masks.
  :func:`merge_sparse_lora` reports what the re-masking removed (share of the update's norm and the
  change of each layer's output on a probe).

Implemented as a peft ``LoraVariant`` installed on the LoRA layers whose base weight is pruned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from ..errors import HybridSparseError
from ..state import get_state, iter_sparse_params

logger = hf_logging.get_logger(__name__)


def _base_mask(module) -> torch.Tensor | None:
    state = get_state(module.get_base_layer()).get("weight")
    return None if state is None else state.mask


def _masked_delta(module, adapter: str) -> torch.Tensor:
    delta = module.get_delta_weight(adapter)  # in the base weight's own layout (fan_in_fan_out handled)
    mask = _base_mask(module)
    return delta * mask.to(device=delta.device, dtype=delta.dtype)


try:
    from peft.tuners.lora.layer import LoraVariant
except ImportError:  # pragma: no cover - peft is a core dependency
    LoraVariant = object


class MaskedLoraVariant(LoraVariant):
    """LoRA whose update is restricted to the kept weights of the pruned base weight."""

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        if _base_mask(module) is None:
            raise HybridSparseError("MaskedLoraVariant needs a pruned base layer (it has no sparsity state).")

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + _masked_delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += _masked_delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - _masked_delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        x = module.lora_dropout[active_adapter](x)
        delta = _masked_delta(module, active_adapter).to(x.dtype)
        if getattr(module, "fan_in_fan_out", False):
            return result + (x @ delta).to(result.dtype)
        return result + nn.functional.linear(x, delta).to(result.dtype)


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def get_sparse_peft_model(
    model: nn.Module, lora_config: Any, mode: str = "masked", adapter_name: str = "default"
):
    """``peft.get_peft_model`` for a pruned model, keeping its sparsity (see module docstring).

    Raises :class:`HybridSparseError` before wrapping when the model is not pruned, ``mode`` is
    unknown, or an adapter would sit on a pruned layer that the chosen mode cannot keep sparse.
    """
    from peft import get_peft_model

    if mode not in ("masked", "remask"):
        raise HybridSparseError(f"mode={mode!r}; choose 'masked' (exact sparse merge) or 'remask'.")
    if not any(True for _ in iter_sparse_params(model)):
        raise HybridSparseError(
            "The model has no sparsity state; prune it (apply_hybrid_sparsity) before adding LoRA."
        )
    peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)
    if mode == "masked":
        install_masked_lora(peft_model)
    return peft_model


def install_masked_lora(peft_model) -> int:
    """Make every adapter on a pruned linear layer mask-aware; returns how many layers changed."""
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for name, module in _lora_layers(peft_model):
        if _base_mask(module) is None:
            continue
        if not isinstance(module, LoraLinear):
            raise HybridSparseError(
                f"{name}: mask-aware LoRA supports linear layers only, not {type(module).__name__}; "
                "remove it from target_modules or use mode='remask'."
            )
        for adapter in module.lora_A:
            module.lora_variant[adapter] = MaskedLoraVariant()
        count += 1
    return count


def load_sparse_peft_model(model: nn.Module, adapter_path: str, mode: str = "masked", **kwargs: Any):
    """``PeftModel.from_pretrained`` for a pruned base model, restoring mask-aware adapters (``mode="masked"``).

    Saved adapters hold only the LoRA weights; the masks come from the base model (e.g. loaded with
    ``from_pretrained`` from a hybrid-sparse checkpoint), so reload the base first.
    """
    from peft import PeftModel

    if not any(True for _ in iter_sparse_params(model)):
        raise HybridSparseError("The base model has no sparsity state; load the pruned checkpoint first.")
    peft_model = PeftModel.from_pretrained(model, adapter_path, **kwargs)
    if mode == "masked":
        install_masked_lora(peft_model)
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

    Masked adapters merge exactly. Vanilla adapters are merged, then the masks are re-applied; the
    report gives, per layer, the share of the update's norm that the re-masking removed.
    """
    report = MergeReport(mode="masked")
    for name, module in _lora_layers(peft_model):
        mask = _base_mask(module)
        if mask is None:
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            delta = module.get_delta_weight(adapter).float()
            kept = delta * mask.to(delta.device)
            total = float(delta.norm()) or 1.0
            masked_variant = isinstance(module.lora_variant.get(adapter), MaskedLoraVariant)
            removed = 0.0 if masked_variant else float((delta - kept).norm()) / total
            if not masked_variant:
                report.mode = "remask"
            report.layers[f"{name}[{adapter}]"] = {"removed_fraction": removed}
    merged = peft_model.merge_and_unload()
    for _, module, pname, state in iter_sparse_params(merged):
        param = getattr(module, pname)
        param.mul_(state.mask.to(device=param.device, dtype=param.dtype))
    if report.mode == "remask":
        logger.info(
            f"Re-masking after the merge removed up to {report.max_removed_fraction:.2%} of an update's norm."
        )
    return merged, report
