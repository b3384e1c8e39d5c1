"""The sparsity state that pruning leaves on modules: the hand-off every other part reads.

After :func:`~hf_hybrid_sparse.apply_hybrid_sparsity`, every pruned parameter has a
:class:`ParamSparsity` in ``module.hf_hybrid_sparse[param_name]`` (a plain dict attribute, so it
survives ``deepcopy``, PEFT wrapping and accelerate hooks; it is not part of ``state_dict``):

* ``mask``: ``torch.bool``, the **parameter's own shape** (``[out, in]`` for ``nn.Linear``,
  ``[in, out]`` for GPT-2's ``Conv1D``, ``[experts, out, in]`` for fused MoE experts); ``True`` = kept.
  It lives on the parameter's device (CPU for offloaded parameters); readers should
  ``.to(param.device)``.
* ``tier_map``: ``torch.int8`` ``[..., out/bs, in/bs]`` in the *logical* ``[out, in]`` orientation
  (codes in :mod:`hf_hybrid_sparse.patterns`), or ``None`` for non-hybrid patterns.
* ``transposed``: the parameter stores ``[in, out]`` (so ``mask.T`` is the logical mask).
* the recipe bits needed to interpret it: ``pattern``, ``block_size``, ``nm``, ``topk_per_block``, ``method``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

STATE_ATTR = "hf_hybrid_sparse"


@dataclass
class ParamSparsity:
    """Mask and tier map of one pruned parameter (see module docstring for layouts)."""

    mask: torch.Tensor
    tier_map: torch.Tensor | None
    pattern: str
    method: str
    block_size: int = 16
    nm: str = "2:4"
    topk_per_block: int = 15
    transposed: bool = False
    format_version: int = 1

    def logical_mask(self) -> torch.Tensor:
        """Mask in ``[..., out, in]`` orientation."""
        return self.mask.transpose(-1, -2) if self.transposed else self.mask

    @property
    def sparsity(self) -> float:
        """Fraction of pruned weights."""
        return 1.0 - self.mask.float().mean().item() if self.mask.numel() else 0.0


def get_state(module: nn.Module) -> dict[str, ParamSparsity]:
    """The per-parameter sparsity state of ``module`` (empty dict if it was never pruned)."""
    return getattr(module, STATE_ATTR, None) or {}


def set_param_state(module: nn.Module, param_name: str, state: ParamSparsity) -> None:
    """Attach ``state`` for ``module.<param_name>``."""
    states = getattr(module, STATE_ATTR, None)
    if states is None:
        states = {}
        # object.__setattr__ keeps nn.Module from treating the dict specially
        object.__setattr__(module, STATE_ATTR, states)
    states[param_name] = state


def iter_sparse_params(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, ParamSparsity]]:
    """Yield ``(module_name, module, param_name, state)`` for every pruned parameter of ``model``."""
    for name, module in model.named_modules():
        for param_name, state in get_state(module).items():
            yield name, module, param_name, state


def clear_state(model: nn.Module) -> None:
    """Remove all sparsity state from ``model`` (weights are left as they are)."""
    for _, module in model.named_modules():
        if hasattr(module, STATE_ATTR):
            object.__delattr__(module, STATE_ATTR)


def sparsity_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.<param>": keep_mask}`` for every pruned parameter (parameter layout)."""
    return {f"{name}.{pname}": st.mask for name, _, pname, st in iter_sparse_params(model)}


def tier_maps(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>" (or "<module>.<param>" for non-``weight`` parameters): tier_map}`` of hybrid-pruned ones."""
    out = {}
    for name, _, pname, st in iter_sparse_params(model):
        if st.tier_map is None:
            continue
        key = name if pname == "weight" else f"{name}.{pname}"
        out[key] = st.tier_map
    return out
