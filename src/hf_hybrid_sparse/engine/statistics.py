"""Gather per-layer input statistics during a block's calibration forwards.

``nn.Linear``/``Conv1D`` inputs come from forward hooks. Fused MoE experts (a 3-D weight,
``F.linear(x, weight[e])`` per routed expert) are observed with a ``TorchFunctionMode``: a
``linear`` call whose weight is a view into a watched 3-D parameter is attributed to expert
``e = offset / stride(0)``, so each expert is calibrated on exactly the tokens routed to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

from ..pruning.scoring import InputStats
from .discovery import Target


class _ExpertLinearMode(TorchFunctionMode):
    def __init__(self, watched: list[tuple[Target, list]], hessian: bool) -> None:
        super().__init__()
        self.watched = watched
        self.hessian = hessian
        self.pending: dict[int, tuple] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and args:
            # `experts.weight[idx]` with a tensor index is a copy, not a view: remember where it came from
            for target, per_expert in self.watched:
                if args[0] is target.param:
                    result = func(*args, **kwargs)
                    index = args[1]
                    if isinstance(index, torch.Tensor) and index.numel() == 1:
                        index = int(index.item())
                    if isinstance(index, int):
                        self.pending[id(result)] = (result, per_expert, index)
                    return result
        if func is torch.nn.functional.linear and len(args) >= 2:
            x, weight = args[0], args[1]
            hit = self.pending.pop(id(weight), None)
            if hit is not None and hit[0] is weight:
                self._add(hit[1], hit[2], x)
                return func(*args, **kwargs)
            for target, per_expert in self.watched:
                param = target.param
                if param.dim() != 3 or weight.dim() != 2 or param.device != weight.device:
                    continue
                if weight.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
                    continue
                expert = (weight.storage_offset() - param.storage_offset()) // param.stride(0)
                self._add(per_expert, expert, x)
                break
        return func(*args, **kwargs)

    def _add(self, per_expert: list, expert: int, x: torch.Tensor) -> None:
        if 0 <= expert < len(per_expert):
            if per_expert[expert] is None:
                per_expert[expert] = InputStats(x.shape[-1], x.device, self.hessian)
            per_expert[expert].add(x)


@contextlib.contextmanager
def eager_experts(targets: list[Target]) -> Iterator[None]:
    """Run fused expert modules with the per-expert eager loop (observable and exact) in the context."""
    changed = []
    for target in targets:
        config = getattr(target.module, "config", None)
        if (
            target.kind == "experts"
            and config is not None
            and getattr(config, "_experts_implementation", "eager") != "eager"
        ):
            changed.append((config, config._experts_implementation))
            config._experts_implementation = "eager"
    try:
        yield
    finally:
        for config, value in reversed(changed):
            config._experts_implementation = value


@contextlib.contextmanager
def collecting(targets: list[Target], hessian: bool) -> Iterator[dict[str, object]]:
    """Context yielding ``{target.name: InputStats | list[InputStats | None]}`` filled by forwards inside it."""
    stats: dict[str, object] = {}
    handles = []
    watched = []
    for target in targets:
        if target.kind == "experts":
            per_expert: list = [None] * target.param.shape[0]
            stats[target.name] = per_expert
            watched.append((target, per_expert))
            continue

        def hook(module, inputs, output, name=target.name):
            x = inputs[0]
            if name not in stats:
                stats[name] = InputStats(x.shape[-1], x.device, hessian)
            stats[name].add(x)

        handles.append(target.module.register_forward_hook(hook))
    mode = _ExpertLinearMode(watched, hessian) if watched else contextlib.nullcontext()
    try:
        with mode:
            yield stats
    finally:
        for h in handles:
            h.remove()
