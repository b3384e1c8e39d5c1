"""Capture what a model passes each decoder block, without per-model code.

One forward per calibration batch runs the model with every decoder block replaced by an
identity that records its positional args and kwargs (attention masks, position ids or
embeddings, alibi, ...). Recording every block, not just the first, keeps per-layer inputs such
as the sliding-window masks of Gemma-2/Mistral right. The last block raises to stop the forward
before the LM head. The first call runs block 0 for real once, to learn what a block returns
(a tensor, or a tuple whose first element is the hidden states).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..devices import input_device, parameter_device
from ..logs import tqdm


class _StopForward(Exception):
    pass


@dataclass
class BlockCall:
    """How to call one block on one batch: args/kwargs with the hidden states taken out."""

    args: tuple
    kwargs: dict
    hidden_in_kwargs: bool

    def call(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Run ``block`` on ``hidden`` with the captured arguments; return the output hidden states."""
        if self.hidden_in_kwargs:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return out if isinstance(out, torch.Tensor) else out[0]


@dataclass
class Captured:
    """First-block hidden states per batch and the call arguments of every block per batch."""

    hidden: list[torch.Tensor]
    calls: list[list[BlockCall]] = field(default_factory=list)  # [block][batch]


def _move(obj: Any, device: torch.device | None, memo: dict) -> Any:
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = (obj, obj.to(device))  # keep obj alive so ids are not reused
        return memo[key][1]
    if isinstance(obj, tuple):
        return tuple(_move(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device, memo) for k, v in obj.items()}
    return obj


_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: list[torch.Tensor],
    store_device: torch.device | None,
    kwargs_device: torch.device | None,
) -> Captured:
    """Run ``model`` on each token batch and record every block's inputs (see module docstring)."""
    n_blocks = len(blocks)
    captured = Captured(hidden=[], calls=[[] for _ in range(n_blocks)])
    structure: dict[str, Any] = {}
    memo: dict = {}
    saved = []

    def make_recorder(index: int, block: nn.Module, original):
        def recorder(*args, **kwargs):
            if "hidden_states" in kwargs:
                hidden = kwargs.pop("hidden_states")
                in_kwargs = True
            else:
                hidden, args = args[0], args[1:]
                in_kwargs = False
            for key in _CACHE_KWARGS:
                if key in kwargs:
                    kwargs[key] = None
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            call = BlockCall(_move(args, kwargs_device, memo), _move(kwargs, kwargs_device, memo), in_kwargs)
            captured.calls[index].append(call)
            if index == 0:
                captured.hidden.append(hidden.detach().to(store_device) if store_device else hidden.detach())
            if "out" not in structure:
                structure["out"] = _probe_output_structure(block, original, hidden, args, kwargs, in_kwargs)
            if index == n_blocks - 1:
                raise _StopForward
            if structure["out"] is None:
                return hidden
            return (hidden,) + (None,) * (structure["out"] - 1)

        return recorder

    for i, block in enumerate(blocks):
        had_own = "forward" in block.__dict__
        saved.append((block, had_own, block.__dict__.get("forward")))
        block.forward = make_recorder(i, block, block.forward)
    try:
        device = input_device(model)
        for batch in tqdm(batches, desc="Capturing calibration inputs", unit="batch"):
            try:
                with torch.no_grad():
                    model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for block, had_own, fwd in saved:
            if had_own:
                block.forward = fwd
            else:
                del block.forward
    if len(captured.hidden) != len(batches):
        raise RuntimeError("The model did not call its first decoder block for every calibration batch.")
    return captured


def _probe_output_structure(block, original, hidden, args, kwargs, in_kwargs) -> int | None:
    """Run the real block once: ``None`` if it returns a tensor, else the length of its tuple."""
    home = parameter_device(block)
    move = home is not None and home != hidden.device and getattr(block, "_hf_hook", None) is None
    if move:  # the block waits on another device (e.g. CPU while pruning runs on a GPU)
        block.to(hidden.device)
    try:
        with torch.no_grad():
            real = (
                original(*args, hidden_states=hidden, **kwargs)
                if in_kwargs
                else original(hidden, *args, **kwargs)
            )
    finally:
        if move:
            block.to(home)
    return None if isinstance(real, torch.Tensor) else len(real)
