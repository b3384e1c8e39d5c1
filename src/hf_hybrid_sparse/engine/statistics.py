"""Gather per-layer input statistics during a block's calibration forwards.

``nn.Linear``/``Conv1D`` inputs come from forward pre-hooks. Fused MoE experts (a 3-D weight,
``F.linear(x, weight[e])`` per routed expert) are observed with a ``TorchFunctionMode``: a
``linear`` call whose weight is a view into a watched 3-D parameter is attributed to expert
``e = offset / stride(0)``, so each expert is calibrated on exactly the tokens routed to it.

The statistics pass discards the block's outputs (the pruned block is run again for them), so with
``stop_in=block`` a forward ends, by :class:`StatisticsComplete`, as soon as every target's input of the
batch is recorded: the last layer's own product (``down_proj`` in a Llama block, a quarter of the
block's linear work) is never computed. This is armed only after a first full forward in which every
target was called exactly once, so a layer called twice, or routed experts, never lose an input.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

from ..pruning.scoring import InputStats
from .discovery import Target


class StatisticsComplete(Exception):
    """Ends a statistics forward early: every target's input of this batch is recorded (see module doc)."""


class _EarlyStop:
    """Counts target calls per forward of ``block``; once armed, stops a forward when all are seen."""

    def __init__(self, block: torch.nn.Module, names: list[str]) -> None:
        self.names = set(names)
        self.calls: dict[str, int] = {}
        self.armed = False
        self.handles = [
            block.register_forward_pre_hook(lambda *_: self.calls.clear()),
            block.register_forward_hook(lambda *_: self._finished()),
        ]

    def _finished(self) -> None:
        # a full forward: arm when each target ran exactly once (no layer called twice, no skipped expert)
        self.armed = self.armed or (
            set(self.calls) == self.names and all(n == 1 for n in self.calls.values())
        )

    def seen(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.armed and len(self.calls) == len(self.names):
            raise StatisticsComplete

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


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


class _SharedInputs:
    """Accumulates each distinct input tensor once; layers given the same tensor object share its statistics.

    Tensors are remembered by weak reference (nothing is kept alive), so an id reused by a new tensor is
    never mistaken for the old one.
    """

    def __init__(self, stats: dict[str, object], hessian: bool) -> None:
        self.stats = stats
        self.hessian = hessian
        self.tensors: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.owner: dict[int, InputStats] = {}
        self.last: dict[int, weakref.ref] = {}  # id(InputStats) -> the tensor it accumulated last

    def add(self, name: str, x: torch.Tensor) -> None:
        current = self.stats.get(name)
        if current is None:
            if (
                self.tensors.get(id(x)) is x
            ):  # another layer accumulated this very tensor: share its statistics
                self.stats[name] = self.owner[id(x)]
                return
            current = self.stats[name] = InputStats(x.shape[-1], x.device, self.hessian)
        else:
            last = self.last.get(id(current))
            if last is not None and last() is x:  # a layer sharing these statistics already added this batch
                return
        current.add(x)
        self.tensors[id(x)] = x
        self.owner[id(x)] = current
        self.last[id(current)] = weakref.ref(x)

    def check(self) -> None:
        """Every layer of a block sees the same tokens: a shared accumulation that went wrong shows here."""
        counts = {name: s.tokens for name, s in self.stats.items() if isinstance(s, InputStats)}
        if len(set(counts.values())) > 1:
            raise RuntimeError(f"calibration statistics saw different token counts per layer: {counts}")


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
def collecting(
    targets: list[Target], hessian: bool, stop_in: torch.nn.Module | None = None
) -> Iterator[dict[str, object]]:
    """Context yielding ``{target.name: InputStats | list[InputStats | None]}`` filled by forwards inside it.

    Linear layers that receive the very same input tensor (q/k/v, gate/up) share one :class:`InputStats`:
    it is accumulated once per forward, not once per layer. With ``stop_in`` (the block whose forwards
    feed the statistics, its outputs unused), forwards of it may raise :class:`StatisticsComplete` once
    nothing is left to record; the caller catches it. Ignored for fused experts and accelerate-hooked blocks.
    """
    stats: dict[str, object] = {}
    shared = _SharedInputs(stats, hessian)
    # not with fused experts (a mode sees them, not a hook) nor with accelerate hooks on the block (a forward
    # ended by the exception would skip their post_forward)
    early = None
    if (
        stop_in is not None
        and targets
        and all(t.kind != "experts" for t in targets)
        and not any(hasattr(m, "_hf_hook") for m in stop_in.modules())
    ):
        early = _EarlyStop(stop_in, [t.name for t in targets])
    handles = []
    watched = []
    for target in targets:
        if target.kind == "experts":
            per_expert: list = [None] * target.param.shape[0]
            stats[target.name] = per_expert
            watched.append((target, per_expert))
            continue

        def hook(module, inputs, name=target.name):
            shared.add(name, inputs[0])
            if early is not None:
                early.seen(name)

        handles.append(target.module.register_forward_pre_hook(hook))
    mode = _ExpertLinearMode(watched, hessian) if watched else contextlib.nullcontext()
    try:
        with mode:
            yield stats
        shared.check()
    finally:
        for h in handles:
            h.remove()
        if early is not None:
            early.remove()
