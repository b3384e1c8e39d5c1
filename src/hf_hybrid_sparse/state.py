"""The sparsity state that pruning leaves on modules: the hand-off every other part reads.

After :func:`~hf_hybrid_sparse.apply_hybrid_sparsity`, every pruned parameter has a
:class:`ParamSparsity` in ``module.hf_hybrid_sparse[param_name]`` (a plain dict attribute, so it
survives ``deepcopy``, PEFT wrapping and accelerate hooks; it is not part of ``state_dict``):

* ``mask``: ``torch.bool``, the **parameter's own shape** (``[out, in]`` for ``nn.Linear``,
  ``[in, out]`` for GPT-2's ``Conv1D``, ``[experts, out, in]`` for fused MoE experts); ``True`` = kept.
  It lives on the parameter's device (CPU for offloaded parameters); readers should
  ``.to(param.device)``. A state restored by ``from_pretrained`` holds it bit-packed until it is first
  read (inference never reads it), then unpacks it once.
* ``tier_map``: ``torch.int8`` ``[..., out/bs, in/bs]`` in the *logical* ``[out, in]`` orientation
  (codes in :mod:`hf_hybrid_sparse.pruning.patterns`), or ``None`` for non-hybrid patterns.
* ``transposed``: the parameter stores ``[in, out]`` (so ``mask.T`` is the logical mask).
* the recipe bits needed to interpret it: ``pattern``, ``block_size``, ``nm``, ``topk_per_block``, ``method``.

**The model enforces its masks.** Attaching a state also makes the module mask the gradient of that
parameter as it is computed (a tensor hook, re-installed by a forward pre-hook whenever the parameter
object was replaced, e.g. after ``deepcopy`` or FSDP's re-registration). Any training loop -- plain
``Trainer``, TRL, accelerate, a hand-written loop -- then leaves pruned weights at exactly zero with the
usual optimizers (SGD, Adam/AdamW with weight decay, Adafactor, ...): their updates of a weight whose
gradient is always zero are zero. :class:`~hf_hybrid_sparse.SparseTrainer` adds the re-masking of weights
after each step (for optimizers that move a weight without a gradient) and the end-of-training check.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from .bits import pack_bits, unpack_bits
from .hostops import count_outside

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
    # (mask it was made from, mask as 0/1 in a gradient's device and dtype): one conversion per change
    _cast: tuple | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_bits(
        cls, bits: np.ndarray, shape: tuple[int, ...], device: torch.device, **recipe: Any
    ) -> ParamSparsity:
        """A state whose ``mask`` stays bit-packed (``bits``: row-major, 8 per byte, LSB first) until it
        is first read, then is unpacked once onto ``device``.

        A loaded model that only runs inference never reads its masks: a bool mask per weight would be
        one byte of fresh memory per parameter (as large as the int8 weights), eight times the bits.
        """
        state = cls(mask=None, **recipe)
        del state.__dict__["mask"]  # reads of .mask now reach __getattr__
        state._packed = (bits, tuple(shape), device)
        return state

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes not in the instance: a mask still packed by from_bits
        packed = self.__dict__.get("_packed")
        if name != "mask" or packed is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        bits, shape, device = packed
        mask = unpack_bits(torch.from_numpy(bits), shape).to(device)
        self.__dict__["mask"] = mask
        self.__dict__.pop("_packed", None)  # another thread may have unpacked it too: same mask
        return mask

    @property
    def shape(self) -> tuple[int, ...]:
        """The mask's shape (the parameter's), without unpacking a mask still packed."""
        packed = self.__dict__.get("_packed")
        return packed[1] if packed is not None else tuple(self.mask.shape)

    def packed_bits(self) -> np.ndarray:
        """The mask bit-packed (row-major, 8 per byte, LSB first), without unpacking a mask still packed.

        The caller must not modify the array: the state may hold it."""
        packed = self.__dict__.get("_packed")
        return packed[0] if packed is not None else pack_bits(self.mask).numpy()

    def __eq__(self, other: object) -> bool:
        # the generated dataclass __eq__ compared masks with ``==`` and raised on any mask of more than
        # one element; equal here: the same recipe, tier map and mask (on any devices)
        if not isinstance(other, ParamSparsity):
            return NotImplemented
        if any(
            getattr(self, f.name) != getattr(other, f.name)
            for f in fields(self)
            if f.compare and f.name not in ("mask", "tier_map")
        ):
            return False
        if (self.tier_map is None) != (other.tier_map is None):
            return False
        if self.tier_map is not None and not torch.equal(self.tier_map.cpu(), other.tier_map.cpu()):
            return False
        return torch.equal(self.mask.cpu(), other.mask.cpu())

    __hash__ = None  # mutable, compared by value

    def logical_mask(self) -> torch.Tensor:
        """Mask in ``[..., out, in]`` orientation."""
        return self.mask.transpose(-1, -2) if self.transposed else self.mask

    @property
    def sparsity(self) -> float:
        """Fraction of pruned weights."""
        return 1.0 - self.mask.float().mean().item() if self.mask.numel() else 0.0

    def mask_like(self, t: torch.Tensor) -> torch.Tensor:
        """The mask as 0/1 values in ``t``'s device and dtype (cached until the mask changes)."""
        cast = self._cast
        if cast is None or cast[0] is not self.mask or cast[1].device != t.device or cast[1].dtype != t.dtype:
            cast = (self.mask, self.mask.to(device=t.device, dtype=t.dtype))
            self._cast = cast
        return cast[1]


class _MaskGradient:
    """Gradient hook of one pruned parameter: multiplies the gradient by the module's current mask."""

    def __init__(self, module: nn.Module, param_name: str) -> None:
        self.module = module
        self.param_name = param_name

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        state = get_state(self.module).get(self.param_name)
        if state is None:
            return grad
        if tuple(grad.shape) != tuple(state.mask.shape):
            from .errors import SparsityError

            raise SparsityError(
                f"{type(self.module).__name__}.{self.param_name}: a gradient of shape {list(grad.shape)} does not "
                f"match the mask {list(state.mask.shape)} (was the layer resized or sharded by hand?)."
            )
        return grad * state.mask_like(grad)


def _has_gradient_guard(param: torch.Tensor) -> bool:
    hooks = getattr(param, "_backward_hooks", None) or {}
    return any(isinstance(h, _MaskGradient) for h in hooks.values())


def _guard_parameters(module: nn.Module, *args) -> None:
    """Forward pre-hook: make sure every pruned parameter of ``module`` carries its gradient hook."""
    if not torch.is_grad_enabled():
        return
    for param_name in get_state(module):
        param = getattr(module, param_name, None)
        if isinstance(param, torch.Tensor) and param.requires_grad and not _has_gradient_guard(param):
            param.register_hook(_MaskGradient(module, param_name))


def get_state(module: nn.Module) -> dict[str, ParamSparsity]:
    """The per-parameter sparsity state of ``module`` (empty dict if it was never pruned)."""
    return getattr(module, STATE_ATTR, None) or {}


def set_param_state(module: nn.Module, param_name: str, state: ParamSparsity) -> None:
    """Attach ``state`` for ``module.<param_name>`` and make the module enforce it on gradients."""
    states = getattr(module, STATE_ATTR, None)
    if states is None:
        states = {}
        # object.__setattr__ keeps nn.Module from treating the dict specially
        object.__setattr__(module, STATE_ATTR, states)
    states[param_name] = state
    if not any(h is _guard_parameters for h in module._forward_pre_hooks.values()):
        module.register_forward_pre_hook(_guard_parameters)
    param = getattr(module, param_name, None)
    if isinstance(param, torch.Tensor) and param.requires_grad and not _has_gradient_guard(param):
        param.register_hook(_MaskGradient(module, param_name))


def iter_sparse_params(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, ParamSparsity]]:
    """Yield ``(module_name, module, param_name, state)`` for every pruned parameter of ``model``."""
    for name, module in model.named_modules():
        for param_name, state in get_state(module).items():
            yield name, module, param_name, state


def clear_state(model: nn.Module) -> None:
    """Remove all sparsity state (and its gradient enforcement) from ``model``; weights stay as they are."""
    for _, module in model.named_modules():
        if hasattr(module, STATE_ATTR):
            object.__delattr__(module, STATE_ATTR)
        for key in [k for k, h in module._forward_pre_hooks.items() if h is _guard_parameters]:
            del module._forward_pre_hooks[key]
        for param in module.parameters(recurse=False):
            hooks = getattr(param, "_backward_hooks", None) or {}
            for key in [k for k, h in hooks.items() if isinstance(h, _MaskGradient)]:
                del hooks[key]


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


def checkable_weight(param: object, state: ParamSparsity) -> torch.Tensor | None:
    """``param`` if its pruned weights can be checked against ``state``'s mask; ``None`` where there is
    nothing to check (no tensor, offloaded to ``meta``, or a shape mismatch, which whoever uses the mask
    reports)."""
    if not isinstance(param, torch.Tensor) or param.device.type == "meta":
        return None
    return param if tuple(param.shape) == state.shape else None


def revived_count(param: object, state: ParamSparsity, keep_bits: np.ndarray | None = None) -> int:
    """Pruned weights of ``param`` that are not zero; 0 where there is nothing to check
    (:func:`checkable_weight`). ``keep_bits``: the mask packed as
    :func:`~hf_hybrid_sparse.hostops.count_outside` takes it, when the caller has it already."""
    weight = checkable_weight(param, state)
    return 0 if weight is None else count_outside(weight, state.mask, keep_bits)


@torch.no_grad()
def revived_weights(model: nn.Module) -> dict[str, int]:
    """``{"<module>.<param>": count}`` of pruned weights that are not zero (empty when the sparsity holds)."""
    bad = {}
    for name, module, pname, state in iter_sparse_params(model):
        count = revived_count(getattr(module, pname, None), state)
        if count:
            bad[f"{name}.{pname}" if name else pname] = count
    return bad


@torch.no_grad()
def apply_masks(model: nn.Module) -> int:
    """Zero every pruned weight of ``model`` (e.g. after a loop that revived some); returns how many changed."""
    changed = 0
    for _, module, pname, state in iter_sparse_params(model):
        param = getattr(module, pname, None)
        if not isinstance(param, torch.Tensor) or param.device.type == "meta":
            continue
        mask = state.mask.to(param.device)
        changed += count_outside(param, mask)
        param.mul_(mask.to(param.dtype))
    return changed
