"""The sequential pruning engine: block by block, any causal LM, in memory or offloaded.

For each decoder block: (1) forward the calibration batches through it with hooks gathering
fp32 input statistics of every target weight, (2) prune every target from those statistics,
(3) forward the batches again through the pruned block; its outputs are the next block's
inputs. Only the block being pruned needs to be on the compute device.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from .capture import capture_block_inputs
from .collect import collecting, eager_experts
from .config import HybridSparseConfig
from .data import DEFAULT_CALIBRATION, get_calibration_samples
from .discovery import Target, check_causal_lm, find_decoder_blocks, find_targets
from .errors import ModelStructureError, PruningError
from .offload import is_offloaded, onloaded, write_param
from .patterns import TIER_NAMES
from .pruning import check_previous_tiers, prune_matrix, shape_problem
from .quantizer import attach
from .report import ModuleReport, SparsityReport
from .state import ParamSparsity, get_state, iter_sparse_params, set_param_state

logger = hf_logging.get_logger(__name__)


def _logical(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    return t.transpose(-1, -2) if transposed else t


def _matrices(target: Target) -> list[tuple[int | None, tuple[int, int]]]:
    shape = target.logical_shape()
    if target.kind == "experts":
        return [(e, shape[1:]) for e in range(shape[0])]
    return [(None, shape)]


def _plan(model: nn.Module, config: HybridSparseConfig, previous: dict[str, torch.Tensor] | None):
    """Find blocks and targets and validate everything before any weight changes."""
    check_causal_lm(model)
    blocks_path, blocks = find_decoder_blocks(model)
    plan: list[list[Target]] = []
    skipped: dict[str, str] = {}
    for i, block in enumerate(blocks):
        targets = find_targets(block, f"{blocks_path}.{i}", config.targets, config.ignore)
        kept = []
        for t in targets:
            shape = t.logical_shape()
            problem = shape_problem(tuple(shape[-2:]), config)
            if problem:
                if config.indivisible == "skip":
                    skipped[t.name] = problem
                    continue
                raise ModelStructureError(
                    f"{t.name}: {problem}. Pick another block size / N:M, add the module to `ignore`, "
                    "or set indivisible='skip' to leave such layers dense."
                )
            kept.append(t)
        plan.append(kept)
    n_targets = sum(len(p) for p in plan)
    if n_targets == 0 and not skipped:
        raise ModelStructureError(
            f"No prunable linear layers found in the decoder blocks at `{blocks_path}` of "
            f"{type(model).__name__} with targets={config.targets!r} and ignore={config.ignore!r}."
        )
    if config.targets is not None:
        inside = {t.name for p in plan for t in p} | set(skipped)
        from .discovery import _matches

        outside = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and _matches(name, config.targets)
            and name not in inside
            and not _matches(name, config.ignore)
        ]
        if outside:
            raise ModelStructureError(
                f"targets match {outside[:3]} outside the decoder blocks; only layers inside "
                f"`{blocks_path}` can be pruned with calibration (ignore them or narrow `targets`)."
            )
    previous = dict(previous or {})
    if config.pattern == "hybrid":
        names = {t.name for p in plan for t in p}
        unknown = sorted(set(previous) - names)
        if unknown:
            raise ModelStructureError(f"previous tier maps given for unknown modules: {unknown[:5]}")
        for p in plan:
            for t in p:
                prev = previous.get(t.name)
                if prev is None:
                    state = get_state(t.module).get(t.param_name)
                    if state is not None and state.tier_map is not None:
                        prev = state.tier_map
                if prev is None:
                    continue
                prev = prev.detach().cpu()
                for e, shape in _matrices(t):
                    try:
                        check_previous_tiers(shape, config, prev if e is None else prev[e])
                    except Exception as exc:
                        raise type(exc)(f"{t.name}: {exc}") from None
                previous[t.name] = prev
    elif previous:
        raise ModelStructureError("previous tier maps only apply to pattern='hybrid'.")
    return blocks_path, blocks, plan, skipped, previous


def _exec_device(block: nn.Module) -> torch.device:
    hook = getattr(block, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for p in block.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _prune_target(
    target: Target,
    config: HybridSparseConfig,
    stats: Any,
    previous: torch.Tensor | None,
) -> tuple[torch.Tensor, ParamSparsity, ModuleReport]:
    param = target.param
    weight = _logical(param.detach(), target.transposed).float()
    old_state = get_state(target.module).get(target.param_name)
    old_mask = None
    if old_state is not None:
        old_mask = _logical(old_state.mask, old_state.transposed).to(weight.device)
    outs, masks, tiers = [], [], []
    for e, _ in _matrices(target):
        w = weight if e is None else weight[e]
        st = stats if e is None else (stats[e] if stats is not None else None)
        cfg = config
        if config.method != "magnitude" and (st is None or st.tokens == 0):
            # an expert no calibration token was routed to: nothing to weigh by, fall back to |W|
            logger.warning(
                f"{target.name}" + (f"[{e}]" if e is not None else "") + " saw no tokens; using magnitude."
            )
            cfg = HybridSparseConfig.from_dict(config.to_dict() | {"method": "magnitude"})
            st = None
        res = prune_matrix(
            w,
            cfg,
            st,
            previous_tiers=None if previous is None else (previous if e is None else previous[e]),
            old_mask=None if old_mask is None else (old_mask if e is None else old_mask[e]),
        )
        outs.append(res.weight)
        masks.append(res.mask)
        tiers.append(res.tier_map)
    if target.kind == "experts":
        new_w, mask = torch.stack(outs), torch.stack(masks)
        tier_map = torch.stack(tiers) if tiers[0] is not None else None
    else:
        new_w, mask, tier_map = outs[0], masks[0], tiers[0]
    new_param = _logical(new_w, target.transposed)
    mask_param = _logical(mask, target.transposed).contiguous()
    mask_device = param.device if param.device.type != "meta" else torch.device("cpu")
    state = ParamSparsity(
        mask=mask_param.to(mask_device),
        tier_map=None if tier_map is None else tier_map.to(torch.int8).cpu(),
        pattern=config.pattern,
        method=config.method,
        block_size=config.block_size,
        nm=config.nm,
        topk_per_block=config.topk_per_block,
        transposed=target.transposed,
    )
    counts = None
    if tier_map is not None:
        counts = {name: int((tier_map == code).sum()) for code, name in TIER_NAMES.items()}
    report = ModuleReport(
        name=target.name,
        shape=tuple(param.shape),
        numel=mask.numel(),
        pruned=int((~mask).sum()),
        tier_counts=counts,
    )
    return new_param, state, report


def _sequential(model, config, calib_dataset, tokenizer, blocks_path, blocks, plan, previous, report) -> None:
    """Capture, then statistics -> prune -> recompute for each block (see module docstring)."""
    needs_data = config.method != "magnitude"
    compute = torch.device(config.device) if config.device else None
    captured = None
    if needs_data:
        samples = get_calibration_samples(
            calib_dataset, tokenizer, config.nsamples, config.seqlen, config.seed, model=model
        )
        report.calibration_tokens = samples.numel()
        batches = list(torch.split(samples, config.batch_size))
        store = torch.device("cpu") if config.offload_activations else compute
        captured = capture_block_inputs(model, blocks, batches, store, compute)
        hidden = captured.hidden

    was_training = model.training
    model.eval()
    bar = hf_logging.tqdm(total=len(blocks), desc="Pruning blocks", unit="block")
    try:
        for i, block in enumerate(blocks):
            block_name = f"{blocks_path}.{i}"
            moved_from = None
            if compute is not None and not is_offloaded(block) and getattr(block, "_hf_hook", None) is None:
                moved_from = _exec_device(block)
                if moved_from != compute:
                    block.to(compute)
                else:
                    moved_from = None
            targets = plan[i]
            stats: dict[str, Any] = {}
            if needs_data and targets:
                bar.set_postfix_str("statistics")
                with collecting(targets, hessian=config.method == "sparsegpt") as stats:
                    for b, h in enumerate(hidden):
                        captured.calls[i][b].call(block, h.to(_exec_device(block)))
            bar.set_postfix_str("pruning")
            with onloaded(block):
                for t in targets:
                    try:
                        new_param, state, mod_report = _prune_target(
                            t, config, stats.get(t.name), previous.get(t.name)
                        )
                        write_param(block, t.module_name, t.param_name, new_param)
                    except Exception as exc:
                        raise PruningError(
                            f"Pruning failed in block {i} (`{block_name}`), module `{t.name}`: {exc}"
                        ) from exc
                    set_param_state(t.module, t.param_name, state)
                    report.modules.append(mod_report)
            if needs_data and i < len(blocks) - 1:
                bar.set_postfix_str("recompute")
                store = hidden[0].device
                hidden = [
                    captured.calls[i][b].call(block, h.to(_exec_device(block))).to(store)
                    for b, h in enumerate(hidden)
                ]
            if moved_from is not None:
                block.to(moved_from)
                for t in targets:  # masks live with their parameters, not on the compute device
                    state = get_state(t.module)[t.param_name]
                    state.mask = state.mask.to(moved_from)
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)


@torch.no_grad()
def apply_hybrid_sparsity(
    model: nn.Module,
    config: HybridSparseConfig | None = None,
    calib_dataset: Any = DEFAULT_CALIBRATION,
    tokenizer: Any = None,
    previous_tier_maps: dict[str, torch.Tensor] | None = None,
) -> SparsityReport:
    """Prune ``model`` in place as ``config`` says and return a :class:`SparsityReport`.

    Args:
        model: any transformers causal LM, on CPU, on a GPU, or dispatched/offloaded by accelerate.
        config: the recipe; defaults to ``HybridSparseConfig()`` (Wanda, hybrid 0.35/0.45/0.20).
        calib_dataset: calibration data (see :func:`hf_hybrid_sparse.data.get_calibration_samples`);
            unused by ``method="magnitude"``.
        tokenizer: needed when ``calib_dataset`` is text; loaded from the model's path if omitted.
        previous_tier_maps: ``{module_name: tier_map}`` from an earlier run (hybrid only); blocks
            never move to a denser tier. Tier maps already on the modules are used when omitted.

    The masks and tier maps are left on the modules (:mod:`hf_hybrid_sparse.state`).
    """
    config = config or HybridSparseConfig()
    config.validate()
    start = time.perf_counter()
    blocks_path, blocks, plan, skipped, previous = _plan(model, config, previous_tier_maps)
    report = SparsityReport(config=config.to_dict())

    with eager_experts([t for p in plan for t in p]):
        _sequential(model, config, calib_dataset, tokenizer, blocks_path, blocks, plan, previous, report)
    for name, why in skipped.items():
        report.modules.append(ModuleReport(name=name, shape=(), numel=0, pruned=0, skipped=why))
    if not attach(model, config):
        logger.warning(
            "The model is quantized by another method: its sparsity state will not be saved with it."
        )
    report.seconds = time.perf_counter() - start
    logger.info(
        f"Pruned {len(report.modules)} weights to {report.sparsity:.2%} sparsity in {report.seconds:.1f} s"
    )
    return report


def sparsity_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.<param>": keep_mask}`` for every pruned parameter (parameter layout)."""
    return {f"{name}.{pname}": st.mask for name, _, pname, st in iter_sparse_params(model)}


def tier_maps(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.<param>" or expert name: tier_map}`` for every hybrid-pruned parameter."""
    out = {}
    for name, _, pname, st in iter_sparse_params(model):
        if st.tier_map is None:
            continue
        key = name if pname == "weight" else f"{name}.{pname}"
        out[key] = st.tier_map
    return out


__all__ = ["apply_hybrid_sparsity", "sparsity_masks", "tier_maps"]
