"""Prune one logical ``[out, in]`` weight matrix according to a :class:`HybridSparseConfig`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import HybridSparseConfig
from ..errors import ModelStructureError
from .patterns import (
    assign_tiers,
    check_tileable,
    checked_previous,
    hybrid_mask,
    hybrid_tiers,
    nm_mask,
    unstructured_mask,
)
from .scoring import InputStats, demote_pruned, magnitude_scores, wanda_scores
from .sparsegpt import hessian_factor, sparsegpt_prune


@dataclass
class MatrixResult:
    """New weight (fp32), keep-mask and tier map (``None`` unless hybrid) of one matrix."""

    weight: torch.Tensor
    mask: torch.Tensor
    tier_map: torch.Tensor | None


def shape_problem(shape: tuple[int, int], config: HybridSparseConfig) -> str | None:
    """Why a ``[out, in]`` matrix cannot take ``config.pattern`` (``None`` if it can)."""
    if config.pattern == "hybrid":
        return check_tileable(shape, config.block_size, config.nm_tuple[1])
    nm = config.pattern_nm
    if nm is not None and shape[1] % nm[1]:
        return f"in_features={shape[1]} is not divisible by M={nm[1]}"
    return None


def check_previous_tiers(shape: tuple[int, int], config: HybridSparseConfig, previous: torch.Tensor) -> None:
    """Validate a previous tier map against a ``[out, in]`` matrix before any weight is touched.

    A dry run of :func:`assign_tiers` on zero scores: it checks the shape, the codes, and that the
    target ratios move no block to a denser tier. With a layer-wise allocation the counts are the
    allocation's (checked when it is made), so only the shape and the codes are checked here.
    """
    blocks = (shape[0] // config.block_size, shape[1] // config.block_size)
    if config.layer_allocation != "uniform":
        checked_previous(previous, blocks, previous.device)
        return
    assign_tiers(torch.zeros(blocks, dtype=torch.float32), config.tier_ratios, config.tier_group, previous)


def prune_matrix(
    weight: torch.Tensor,
    config: HybridSparseConfig,
    stats: InputStats | None = None,
    previous_tiers: torch.Tensor | None = None,
    old_mask: torch.Tensor | None = None,
    layer_counts: tuple[int, int, int] | None = None,
) -> MatrixResult:
    """Prune a logical ``[out, in]`` weight; ``stats`` are needed for ``wanda`` and ``sparsegpt``.

    ``old_mask`` is the keep-mask of an earlier pruning: its pruned weights rank below every kept
    one, so they stay pruned whenever the new pattern removes at least as many per group.
    ``layer_counts``: this layer's DENSE/NM/TOPK block counts from a layer-wise allocation (hybrid), in place
    of ``config.tier_ratios``.
    """
    problem = shape_problem(tuple(weight.shape), config)
    if problem:
        raise ModelStructureError(problem)
    W = weight.detach().float()
    if config.method == "sparsegpt":
        if stats is None:
            raise ValueError("sparsegpt needs calibration statistics")
        nm = config.pattern_nm
        new_w, mask, tiers = sparsegpt_prune(
            W,
            stats.derived(
                ("sparsegpt", config.dampening), lambda: hessian_factor(stats.hessian(), config.dampening)
            ),
            pattern="nm" if nm else config.pattern,
            sparsity=config.sparsity,
            group=config.comparison_group,
            nm=nm or config.nm_tuple,
            block_size=config.block_size,
            topk_per_block=config.topk_per_block,
            tier_ratios=config.tier_ratios,
            tier_group=config.tier_group,
            tier_rule=config.tier_rule,
            layer_counts=layer_counts,
            previous_tiers=previous_tiers,
            old_mask=old_mask,
            dampening=config.dampening,
            blocksize=config.sparsegpt_blocksize,
        )
        return MatrixResult(new_w, mask, tiers)

    if config.method == "magnitude":
        scores = magnitude_scores(W)
    else:
        if stats is None:
            raise ValueError("wanda needs calibration statistics")
        scores = wanda_scores(W, stats)
    scores = demote_pruned(scores, old_mask)

    tiers = None
    if config.pattern == "unstructured":
        mask = unstructured_mask(scores, config.sparsity, config.comparison_group)
    elif config.pattern == "hybrid":
        n, m = config.nm_tuple
        # the loss rule weighs a weight by the output error its removal causes, (|W_ij| ||X_j||)^2
        costs = scores.clamp_min(0).pow(2) if config.tier_rule == "loss" else scores
        tiers = hybrid_tiers(
            costs,
            config.tier_ratios,
            config.tier_group,
            previous_tiers,
            bs=config.block_size,
            n=n,
            m=m,
            k=config.topk_per_block,
            rule=config.tier_rule,
            layer_counts=layer_counts,
        )
        mask = hybrid_mask(scores, tiers, config.block_size, n, m, config.topk_per_block)
    else:
        n, m = config.pattern_nm
        mask = nm_mask(scores, n, m)
    if old_mask is not None:
        mask &= old_mask.to(mask.device)
    return MatrixResult(W * mask, mask, tiers)
