"""The sequential pruning walk: block by block, any causal LM, in memory or offloaded.

For each decoder block: (1) forward the calibration batches through it with hooks gathering
fp32 input statistics of every target weight, (2) prune every target from those statistics,
(3) forward the batches again through the pruned block; its outputs are the next block's
inputs. The forwards of (1) end once every target's input is recorded (see ``statistics``). Only
the block being pruned needs to be on the compute device.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from torch import nn

from ..config import HybridSparseConfig
from ..data.calibration import DEFAULT_CALIBRATION, get_calibration_samples
from ..devices import execution_device
from ..errors import PruningError
from ..logs import get_logger, tqdm, warn_if_long
from ..pruning.matrix import prune_matrix
from ..pruning.patterns import TIER_NAMES
from ..state import ParamSparsity, get_state, set_param_state
from .allocation import Allocation, allocate, block_scores_of, summarize_block
from .capture import capture_block_inputs
from .discovery import Target
from .offload import is_offloaded, onloaded, write_param
from .planning import Plan, matrices, plan
from .reconstruction import reconstruct_block
from .report import ModuleReport, SparsityReport
from .statistics import StatisticsComplete, collecting, eager_experts

logger = get_logger(__name__)


def _logical(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    return t.transpose(-1, -2) if transposed else t


def _prune_target(
    target: Target,
    config: HybridSparseConfig,
    stats: Any,
    previous: torch.Tensor | None,
    allocation: Allocation | None = None,
) -> tuple[torch.Tensor, ParamSparsity, ModuleReport]:
    param = target.param
    weight = _logical(param.detach(), target.transposed).float()
    if not bool(torch.isfinite(weight).all()):
        raise PruningError(
            f"{target.name} holds non-finite weights (NaN or inf); pruning needs finite weights."
        )
    old_state = get_state(target.module).get(target.param_name)
    old_mask = None
    if old_state is not None:
        old_mask = _logical(old_state.mask, old_state.transposed).to(weight.device)
    outs, masks, tiers = [], [], []
    layer_counts = None if allocation is None else allocation.counts.get(target.name)
    if allocation is not None and target.name in allocation.sparsity:
        config = HybridSparseConfig.from_dict(
            config.to_dict() | {"sparsity": allocation.sparsity[target.name]}
        )
    for index, (e, _) in enumerate(matrices(target)):
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
            layer_counts=None if layer_counts is None else layer_counts[index],
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


def _done_message(failed: int, total: int) -> str:
    if failed == 0:
        return "No weight was changed."
    return (
        f"Blocks 0..{failed - 1} of {total} are pruned and carry their sparsity state; block {failed} and later "
        "are unchanged."
    )


def _to_compute(block: nn.Module, compute: torch.device | None) -> torch.device | None:
    """Move an in-memory block to ``compute``; returns where it was (``None``: not moved)."""
    if compute is None or is_offloaded(block) or getattr(block, "_hf_hook", None) is not None:
        return None
    here = execution_device(block)
    if here == compute:
        return None
    block.to(compute)
    return here


def _dense_pass(p: Plan, config: HybridSparseConfig, captured, hidden, compute) -> list[Any]:
    """The allocation's pre-pass over the dense model: each block's metrics (Wanda score, or |W| without
    data) summarised by the allocation, its dense outputs feeding the next block."""
    measured: list = []
    bar = tqdm(total=len(p.blocks), desc=f"Measuring layers ({config.layer_allocation})", unit="block")
    try:
        for i, block in enumerate(p.blocks):
            targets = p.targets[i]
            moved_from = _to_compute(block, compute)
            stats: dict[str, Any] = {}
            if captured is not None:
                outs = []
                with collecting(targets, hessian=False) as stats:
                    for b, h in enumerate(hidden):
                        outs.append(
                            captured.calls[i][b].call(block, h.to(execution_device(block))).to(h.device)
                        )
                hidden = outs
            with onloaded(block):
                scores = block_scores_of(
                    targets, stats, lambda t: _logical(t.param.detach(), t.transposed).float()
                )
                measured.append(summarize_block(scores, config))
            if moved_from is not None:
                block.to(moved_from)
            bar.update(1)
    finally:
        bar.close()
    return measured


def _walk(
    model, config: HybridSparseConfig, calib_dataset, tokenizer, p: Plan, report: SparsityReport
) -> None:
    """Capture, then statistics -> prune -> recompute for each block (see module docstring)."""
    blocks = p.blocks
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
    # block-wise reconstruction fits each pruned block to the dense model's outputs: carry that chain too
    dense_hidden = hidden if needs_data and config.reconstruction_epochs else None

    was_training = model.training
    model.eval()
    allocation = None
    if config.layer_allocation != "uniform":
        measured = _dense_pass(p, config, captured, hidden if needs_data else None, compute)
        allocation = allocate(p, config, measured, p.previous)
        report.allocation = allocation.to_dict()
    bar = tqdm(total=len(blocks), desc="Pruning blocks", unit="block")
    started = time.perf_counter()
    try:
        for i, block in enumerate(blocks):
            block_name = f"{p.blocks_path}.{i}"
            moved_from = _to_compute(block, compute)
            targets = p.targets[i]
            stats: dict[str, Any] = {}
            dense_out = None
            if dense_hidden is not None:
                bar.set_postfix_str("dense outputs")
                dense_out = [
                    captured.calls[i][b].call(block, h.to(execution_device(block)))
                    for b, h in enumerate(dense_hidden)
                ]
            if needs_data and targets:
                bar.set_postfix_str("statistics")
                # the outputs are not used: a forward may end once every input is recorded
                with collecting(targets, hessian=config.method == "sparsegpt", stop_in=block) as stats:
                    for b, h in enumerate(hidden):
                        with contextlib.suppress(StatisticsComplete):
                            captured.calls[i][b].call(block, h.to(execution_device(block)))
            bar.set_postfix_str("pruning")
            with onloaded(block):
                # a block is pruned entirely or not at all: compute every target first, then write them
                results = []
                for t in targets:
                    try:
                        results.append(
                            (
                                t,
                                *_prune_target(
                                    t, config, stats.get(t.name), p.previous.get(t.name), allocation
                                ),
                            )
                        )
                    except Exception as exc:
                        raise PruningError(
                            f"Pruning failed in block {i} (`{block_name}`), module `{t.name}`: {exc}. "
                            + _done_message(i, len(blocks))
                        ) from exc
                for t, new_param, state, mod_report in results:
                    write_param(block, t.module_name, t.param_name, new_param)
                    set_param_state(t.module, t.param_name, state)
                    report.modules.append(mod_report)
            fitted = None  # the block's outputs, when reconstruction already computed them
            if dense_out is not None and targets:
                bar.set_postfix_str("reconstruction")
                dev = execution_device(block)
                rec, fitted = reconstruct_block(
                    i,
                    block,
                    targets,
                    lambda b, calls=captured.calls[i], blk=block, hs=hidden, dev=dev: calls[b].call(
                        blk, hs[b].to(dev)
                    ),
                    dense_out,
                    config.reconstruction_epochs,
                    config.reconstruction_lr,
                )
                report.reconstruction.append(rec.to_dict())
                logger.info(
                    f"{block_name}: output error {rec.before:.4g} -> {rec.after:.4g} after reconstruction"
                )
            if needs_data and i < len(blocks) - 1:
                bar.set_postfix_str("recompute")
                store = hidden[0].device
                if fitted is None:
                    fitted = [
                        captured.calls[i][b].call(block, h.to(execution_device(block)))
                        for b, h in enumerate(hidden)
                    ]
                hidden = [o.to(store) for o in fitted]
                if dense_out is not None:
                    dense_hidden = [o.to(store) for o in dense_out]
            if moved_from is not None:
                block.to(moved_from)
                for t in targets:  # masks live with their parameters, not on the compute device
                    state = get_state(t.module)[t.param_name]
                    state.mask = state.mask.to(moved_from)
            bar.update(1)
            if i == 0 and needs_data:
                warn_if_long(
                    logger,
                    f"Pruning {len(blocks)} blocks on {report.calibration_tokens} calibration tokens",
                    time.perf_counter() - started,
                    len(blocks),
                    "fewer tokens make it faster (nsamples x seqlen, e.g. 32 x 512 on a CPU).",
                )
    finally:
        bar.close()
        model.train(was_training)


@torch.no_grad()
def prune_model(
    model: nn.Module,
    config: HybridSparseConfig,
    calib_dataset: Any = DEFAULT_CALIBRATION,
    tokenizer: Any = None,
    previous_tier_maps: dict[str, torch.Tensor] | None = None,
) -> SparsityReport:
    """Prune ``model`` in place and leave the masks and tier maps on its modules; return the report.

    The engine alone: :func:`hf_hybrid_sparse.apply_hybrid_sparsity` also attaches the recipe and the
    quantizer so that ``save_pretrained`` writes the state.
    """
    config.validate()
    start = time.perf_counter()
    p = plan(model, config, previous_tier_maps)
    report = SparsityReport(config=config.to_dict())
    with eager_experts(p.all_targets()):
        _walk(model, config, calib_dataset, tokenizer, p, report)
    for name, why in p.skipped.items():
        report.modules.append(ModuleReport(name=name, shape=(), numel=0, pruned=0, skipped=why))
    report.seconds = time.perf_counter() - start
    return report
