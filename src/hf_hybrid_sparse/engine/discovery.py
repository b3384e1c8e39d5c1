"""Architecture-agnostic discovery: the decoder-block stack and the prunable weights in a block.

No per-model code: the decoder stack is the longest ``nn.ModuleList`` whose children all share
one class, preferring classes the model lists in ``_no_split_modules`` (the unit transformers
and accelerate already treat as a block). Prunable weights are the 2-D weights of
``nn.Linear`` and GPT-2-style ``Conv1D`` (stored transposed), and the 3-D stacked weights of
fused MoE expert modules (transformers v5 ``*Experts`` modules, one ``[out, in]`` matrix per expert).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..errors import ModelStructureError


@dataclass
class Target:
    """One prunable weight: ``module.<param_name>``, named ``name`` in the model."""

    name: str
    module_name: str  # relative to the block
    module: nn.Module
    param_name: str
    kind: str  # "linear" | "conv1d" | "experts"

    @property
    def transposed(self) -> bool:
        return self.kind == "conv1d"

    @property
    def param(self):
        return getattr(self.module, self.param_name)

    def logical_shape(self) -> tuple[int, ...]:
        """Shape in ``[..., out, in]`` orientation."""
        shape = tuple(self.param.shape)
        return (shape[1], shape[0]) if self.transposed else shape


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - always present in transformers 5
        return None
    return Conv1D


def check_causal_lm(model: nn.Module) -> None:
    """Reject encoder-decoder and non-causal models with a clear message."""
    config = getattr(model, "config", None)
    if config is None:
        raise ModelStructureError(f"{type(model).__name__} has no `config`; pass a transformers causal LM.")
    if getattr(config, "is_encoder_decoder", False):
        raise ModelStructureError(
            f"{type(model).__name__} is an encoder-decoder model; hf-hybrid-sparse prunes decoder-only "
            "causal LMs (AutoModelForCausalLM)."
        )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    name = type(model).__name__
    if name not in causal_classes and not name.endswith("ForCausalLM"):
        raise ModelStructureError(
            f"{name} is not a causal language model; load it with AutoModelForCausalLM "
            "(a bare base model or a classification head cannot be calibrated by next-token forwards)."
        )


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(path, module_list)`` of the decoder-block stack of ``model``."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    best = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        cls_name = next(iter(classes)).__name__
        key = (cls_name in no_split, len(module), -path.count("."))
        if best is None or key > best[0]:
            best = (key, path, module)
    if best is None:
        raise ModelStructureError(
            f"No stack of identical decoder blocks (nn.ModuleList) found in {type(model).__name__}."
        )
    return best[1], best[2]


def matches(name: str, spec: list[str] | str | None) -> bool:
    """Whether module ``name`` is selected by ``spec``: a regex (full match) or names/dotted suffixes."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _is_experts(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Experts") or hasattr(module, "num_experts")


def find_targets(
    block: nn.Module, block_name: str, targets: list[str] | str | None, ignore: list[str] | str | None
) -> list[Target]:
    """Prunable weights of one decoder block, filtered by ``targets``/``ignore`` (full names)."""
    conv1d = _conv1d_class()
    found = []
    for rel, module in block.named_modules():
        full = f"{block_name}.{rel}" if rel else block_name
        if isinstance(module, nn.Linear):
            candidates = [(full, "weight", "linear")]
        elif conv1d is not None and isinstance(module, conv1d):
            candidates = [(full, "weight", "conv1d")]
        elif _is_experts(module):
            candidates = [
                (f"{full}.{pname}", pname, "experts")
                for pname, p in module.named_parameters(recurse=False)
                if p.dim() == 3
            ]
        else:
            continue
        for name, pname, kind in candidates:
            if targets is not None and not matches(name, targets):
                continue
            if matches(name, ignore):
                continue
            found.append(Target(name, rel, module, pname, kind))
    return found
