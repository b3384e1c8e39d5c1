"""Planning a pruning run: find blocks and targets and validate everything before any weight changes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import HybridSparseConfig
from ..errors import ModelStructureError
from ..pruning.matrix import check_previous_tiers, shape_problem
from ..state import get_state
from .discovery import Target, check_causal_lm, find_decoder_blocks, find_targets, matches
from .offload import is_offloaded


@dataclass
class Plan:
    """What a run will prune: the block stack, the targets of each block, and the previous tier maps."""

    blocks_path: str
    blocks: nn.ModuleList
    targets: list[list[Target]]  # [block][target]
    skipped: dict[str, str] = field(default_factory=dict)  # module -> why it stays dense
    previous: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> previous tier map

    def all_targets(self) -> list[Target]:
        return [t for block in self.targets for t in block]


def matrices(target: Target) -> list[tuple[int | None, tuple[int, int]]]:
    """``(expert index or None, [out, in])`` of every matrix a target holds (one per expert for MoE)."""
    shape = target.logical_shape()
    if target.kind == "experts":
        return [(e, shape[1:]) for e in range(shape[0])]
    return [(None, shape)]


def plan(model: nn.Module, config: HybridSparseConfig, previous: dict[str, torch.Tensor] | None) -> Plan:
    """Find blocks and targets, check shapes and previous tier maps; raises before any weight changes."""
    check_causal_lm(model)
    blocks_path, blocks = find_decoder_blocks(model)
    per_block: list[list[Target]] = []
    skipped: dict[str, str] = {}
    for i, block in enumerate(blocks):
        kept = []
        for t in find_targets(block, f"{blocks_path}.{i}", config.targets, config.ignore):
            problem = shape_problem(tuple(t.logical_shape()[-2:]), config)
            if problem:
                if config.indivisible == "skip":
                    skipped[t.name] = problem
                    continue
                raise ModelStructureError(
                    f"{t.name}: {problem}. Pick another block size / N:M, add the module to `ignore`, "
                    "or set indivisible='skip' to leave such layers dense."
                )
            kept.append(t)
        per_block.append(kept)
    result = Plan(blocks_path, blocks, per_block, skipped)
    if not result.all_targets():
        if skipped:
            first = next(iter(skipped.items()))
            raise ModelStructureError(
                f"indivisible='skip' leaves every one of the {len(skipped)} targeted layers dense (e.g. "
                f"{first[0]}: {first[1]}): nothing would be pruned. Pick a block size / N:M that fits the model."
            )
        raise ModelStructureError(
            f"No prunable linear layers found in the decoder blocks at `{blocks_path}` of "
            f"{type(model).__name__} with targets={config.targets!r} and ignore={config.ignore!r}."
        )
    if config.targets is not None:
        _check_targets_inside(model, config, result)
    _check_weights(result, config)
    _check_composition(config, result)
    result.previous = _previous_tier_maps(config, result, previous)
    return result


def _check_weights(plan: Plan, config: HybridSparseConfig) -> None:
    """Every target weight is loaded (or offloaded by accelerate) and finite."""
    for block, targets in zip(plan.blocks, plan.targets):
        for t in targets:
            param = t.param
            if param.device.type == "meta":
                if is_offloaded(block) and config.reconstruction_epochs:
                    raise ModelStructureError(
                        f"{t.name}: reconstruction_epochs trains the pruned weights, which an accelerate-offloaded "
                        "block does not hold in memory. Load the model in memory (device_map=None or one device) "
                        "or set reconstruction_epochs=0. No weight was changed."
                    )
                if not is_offloaded(block):
                    raise ModelStructureError(
                        f"{t.name}: the weight is on the meta device (not loaded) and no accelerate hook offloads it; "
                        "load the model with its weights (or with a device_map that offloads them)."
                    )
                continue  # checked when its block is loaded
            if not bool(torch.isfinite(param.detach()).all()):
                raise ModelStructureError(
                    f"{t.name} holds non-finite weights (NaN or inf); pruning needs finite weights. No weight was changed."
                )


def _check_composition(config: HybridSparseConfig, plan: Plan) -> None:
    """Re-pruning keeps the old zeros; hybrid tiers cannot, over a mask that pruned weights of DENSE blocks."""
    if config.pattern != "hybrid":
        return
    for t in plan.all_targets():
        state = get_state(t.module).get(t.param_name)
        if state is not None and state.pattern != "hybrid":
            raise ModelStructureError(
                f"{t.name} is already pruned with pattern {state.pattern!r}: hybrid DENSE blocks keep every weight, so "
                "they cannot hold its pruned zeros. Prune the dense model as hybrid, or prune this one again with "
                f"pattern={state.pattern!r} (or 'unstructured')."
            )


def _check_targets_inside(model: nn.Module, config: HybridSparseConfig, plan: Plan) -> None:
    inside = {t.name for t in plan.all_targets()} | set(plan.skipped)
    outside = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and matches(name, config.targets)
        and name not in inside
        and not matches(name, config.ignore)
    ]
    if outside:
        raise ModelStructureError(
            f"targets match {outside[:3]} outside the decoder blocks; only layers inside "
            f"`{plan.blocks_path}` can be pruned with calibration (ignore them or narrow `targets`)."
        )


def _previous_tier_maps(
    config: HybridSparseConfig, plan: Plan, given: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """Given maps, else the maps already on the modules; each checked by a dry run of the tier assignment."""
    given = dict(given or {})
    if config.pattern != "hybrid":
        if given:
            raise ModelStructureError("previous tier maps only apply to pattern='hybrid'.")
        return {}
    names = {t.name for t in plan.all_targets()}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ModelStructureError(f"previous tier maps given for unknown modules: {unknown[:5]}")
    previous = {}
    for t in plan.all_targets():
        prev = given.get(t.name)
        if prev is None:
            state = get_state(t.module).get(t.param_name)
            prev = state.tier_map if state is not None else None
        if prev is None:
            continue
        prev = prev.detach().cpu()
        for e, shape in matrices(t):
            try:
                check_previous_tiers(shape, config, prev if e is None else prev[e])
            except Exception as exc:
                raise type(exc)(f"{t.name}: {exc}") from None
        previous[t.name] = prev
    return previous
