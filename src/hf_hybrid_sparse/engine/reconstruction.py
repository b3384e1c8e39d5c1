"""Block-wise reconstruction: after a block is pruned, fit its kept weights to the dense model's outputs.

The layer-wise solvers (Wanda, SparseGPT) each fit one matrix to its own inputs. Here the whole pruned
block is fitted, with its masks fixed, so that on the inputs the *pruned* model gives it, it reproduces
the outputs the model gave at that depth before this run (the dense model's, on a first pruning): the
error of earlier blocks is corrected too (the block-wise fine-tuning of EBFT, Guo et al. 2024, on the
calibration set). Only the pruned weights train;
a weight the mask removed gets no gradient and stays zero, so every tier keeps its pattern.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..state import get_state
from .discovery import Target


@dataclass
class Reconstruction:
    """Normalised output error of one block before and after its reconstruction."""

    block: int
    before: float
    after: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _normalised_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # relative to the target's energy, so that blocks of different output scale weigh alike
    return (out.float() - target.float()).pow(2).mean() / target.float().pow(2).mean().clamp_min(1e-12)


@torch.no_grad()
def _error(run: Callable[[int], torch.Tensor], targets: Sequence[torch.Tensor]) -> tuple[float, list]:
    """Mean normalised error of ``run`` against ``targets``, and the outputs it gave."""
    outputs = [run(b) for b in range(len(targets))]
    return sum(float(_normalised_mse(o, t)) for o, t in zip(outputs, targets)) / len(targets), outputs


def reconstruct_block(
    index: int,
    block: nn.Module,
    targets: list[Target],
    run: Callable[[int], torch.Tensor],
    dense_outputs: Sequence[torch.Tensor],
    epochs: int,
    lr: float,
) -> tuple[Reconstruction, list[torch.Tensor]]:
    """Fit the kept weights of ``targets`` so that ``run(b)`` (the block on batch ``b`` of the pruned
    model's inputs) matches ``dense_outputs[b]``; ``epochs`` passes of Adam, one step per batch.

    Returns the errors and the fitted block's outputs on every batch (the next block's inputs). The block
    must be in memory (not offloaded); its masks are read from the per-module state, whose gradient
    hooks (``state.set_param_state``) keep pruned weights out of every step.
    """
    params = [t.param for t in targets]
    masks = [get_state(t.module)[t.param_name].mask.to(t.param.device) for t in targets]
    before, _ = _error(run, dense_outputs)
    flags = {p: p.requires_grad for p in block.parameters()}
    originals = [p.data for p in params]
    done = False
    try:
        for p in block.parameters():
            p.requires_grad_(False)
        for p in params:
            # Adam on half-precision weights loses its small steps: train fp32 copies, written back at the end
            p.data = p.data.float().clone()
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        low = [o.dtype for o in originals if o.dtype != torch.float32]
        # fp32 master weights, computed in the model's own precision as mixed-precision training does; no
        # cast cache, which would keep serving the weights of the first step
        compute = (
            torch.autocast(params[0].device.type, dtype=low[0], cache_enabled=False)
            if low
            else contextlib.nullcontext()
        )
        with torch.enable_grad(), compute:
            for _ in range(epochs):
                for b, target in enumerate(dense_outputs):
                    _normalised_mse(run(b), target).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    # the gradient hooks already mask every step; this also clears what rounding could leave
                    with torch.no_grad():
                        for p, mask in zip(params, masks):
                            p.mul_(mask)
        done = True
    finally:
        for p, orig in zip(params, originals):
            if done:  # the fitted values go into the original storage (views and ties see them)
                orig.copy_(p.data.to(orig.dtype))
            p.data = orig
            p.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
    after, outputs = _error(run, dense_outputs)
    return Reconstruction(index, before, after), outputs
