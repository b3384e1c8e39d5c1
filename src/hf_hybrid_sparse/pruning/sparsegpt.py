"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with weight update, for every pattern.

The solver walks the columns in chunks of ``blocksize``. Masks are chosen adaptively from the
OBS saliency ``w^2 / [H^-1]_jj^2`` of the *current* (already updated) weights: per chunk for
unstructured and TOPK blocks (a chunk holds whole 16-wide block columns), every M columns for
N:M groups. Each pruned weight's error is spread over the not-yet-processed columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import PruningError
from ..logs import get_logger
from ..native import available as use_native
from .patterns import (
    NM,
    TOPK,
    _sorted_keep,
    assign_tiers_min_loss,
    expand_tiers,
    hybrid_tiers,
    tier_costs,
    topk_block_mask,
)
from .scoring import demote_pruned

logger = get_logger(__name__)


@dataclass(frozen=True)
class HessianFactor:
    """What SparseGPT needs from a Hessian, computed once per input (layers fed the same input share it).

    ``dead``: inputs that were always zero (their weights are zeroed); ``hinv``: upper Cholesky factor of
    ``(H + damp I)^-1`` with the dead diagonal set to 1; ``damp``: the relative dampening that worked.
    """

    dead: torch.Tensor
    hinv: torch.Tensor
    damp: float


def hessian_factor(hessian: torch.Tensor, dampening: float) -> HessianFactor:
    """Factor ``hessian`` (``2 X^T X / n``) for :func:`sparsegpt_prune`; more damping if it is not PD."""
    H = hessian.detach().float().clone(memory_format=torch.contiguous_format)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    hinv, damp = _inverse_hessian_factor(H, dampening)
    return HessianFactor(dead, hinv, damp)


def _inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp I)^-1`` and the damping used; retries with 10x more if not PD."""
    diag_mean = torch.diag(hessian).mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp = dampening
    for _ in range(6):
        try:
            # The paper's factor is cholesky(inverse(A), upper) for A = H + damp I. With J the reversal of
            # the inputs and M = cholesky(J A J), the same factor is J M^-1 J: one factorisation and one
            # triangular inverse instead of a factorisation, an inverse and another factorisation (0.8x
            # the time at 1536 inputs; the same matrix up to rounding, as uniqueness of the factor says).
            low = torch.linalg.cholesky((hessian + damp * diag_mean * eye).flip(0, 1))
            factor = torch.linalg.solve_triangular(low, eye, upper=False).flip(0, 1)
            if damp != dampening:
                logger.warning(
                    "SparseGPT: the Hessian (%d inputs) was not positive definite with dampening=%g; "
                    "used %g. More calibration tokens or a larger `dampening` avoid this.",
                    hessian.shape[0],
                    dampening,
                    damp,
                )
            return factor, damp
        except torch.linalg.LinAlgError:
            damp = max(damp * 10.0, 1e-4)
    raise PruningError(
        f"SparseGPT: the Hessian ({hessian.shape[0]} inputs) is not positive definite even with "
        f"dampening={damp / 10:g}; calibrate on more tokens or check the inputs for NaN/constant columns."
    )


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor | HessianFactor,
    *,
    pattern: str,
    sparsity: float = 0.5,
    group: str = "row",
    nm: tuple[int, int] = (2, 4),
    block_size: int = 16,
    topk_per_block: int = 15,
    tier_ratios: tuple[float, float, float] = (0.35, 0.45, 0.20),
    tier_group: str = "layer",
    tier_rule: str = "loss",
    layer_counts: tuple[int, int, int] | None = None,
    previous_tiers: torch.Tensor | None = None,
    old_mask: torch.Tensor | None = None,
    dampening: float = 0.01,
    blocksize: int = 128,
    native: bool | None = None,
    rechoose_tiers: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Prune ``weight`` (``[out, in]``) with the OBS update; returns ``(new_weight, keep_mask, tier_map)``.

    ``pattern`` is ``"unstructured"``, ``"nm"`` (N:M everywhere, ``nm`` gives N and M) or ``"hybrid"``.
    ``hessian`` is ``2 X^T X / n`` in fp32, or its :func:`hessian_factor` (then ``dampening`` is unused), which
    layers fed the same input share. ``old_mask`` (keep-mask of an earlier pruning) is honoured:
    weights it removed stay removed. ``native`` runs each chunk's sequential column loop in C++ (default:
    when :mod:`hf_hybrid_sparse.native` is available); the PyTorch loop gives the same result up to rounding.
    With ``tier_rule="loss"`` and ``rechoose_tiers``, the upfront tier map fixes how many blocks of each tier
    every chunk gets (per block-row or per chunk), and at the start of each chunk the tiers of its blocks are
    chosen again, with the same counts, from the saliency of the weights the OBS updates have changed.
    """
    if native is None:
        native = use_native()
    W = weight.detach().float().clone(memory_format=torch.contiguous_format)
    rows, cols = W.shape
    factor = hessian if isinstance(hessian, HessianFactor) else hessian_factor(hessian, dampening)
    dead, hinv = factor.dead.to(W.device), factor.hinv.to(W.device)
    W[:, dead] = 0.0
    diag = torch.diag(hinv)
    n_keep, m = nm
    old = old_mask.to(W.device) if old_mask is not None else None

    def saliency(w: torch.Tensor, d: torch.Tensor, col0: int) -> torch.Tensor:
        s = w.pow(2) / d.pow(2).unsqueeze(0)
        return demote_pruned(s, None if old is None else old[:, col0 : col0 + w.shape[1]])

    tiers = None
    per_weight_tier = None
    if pattern == "hybrid":
        tiers = hybrid_tiers(
            saliency(W, diag, 0),
            tier_ratios,
            tier_group,
            previous_tiers,
            bs=block_size,
            n=n_keep,
            m=m,
            k=topk_per_block,
            rule=tier_rule,
            layer_counts=layer_counts,
        )
        per_weight_tier = expand_tiers(tiers, block_size).to(W.device)

    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone(memory_format=torch.contiguous_format)
        Err1 = torch.zeros_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(hinv1)
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        if pattern == "hybrid" and tier_rule == "loss" and rechoose_tiers:
            b0, b1 = i1 // block_size, i2 // block_size
            here = tiers[:, b0:b1].long()
            per_group = here.reshape(1, -1) if tier_group == "layer" else here
            counts = torch.stack([(per_group == code).sum(1) for code in range(3)], dim=1)
            chosen = assign_tiers_min_loss(
                tier_costs(saliency(W1, d1, i1).clamp_min(0), block_size, n_keep, m, topk_per_block),
                tier_ratios,
                tier_group,
                None if previous_tiers is None else previous_tiers[:, b0:b1],
                counts=counts,
            )
            tiers[:, b0:b1] = chosen
            per_weight_tier[:, i1:i2] = expand_tiers(chosen, block_size).to(W.device)
        if pattern == "unstructured":
            sal = saliency(W1, d1, i1)
            if group == "row":
                k = math.floor(sparsity * i2) - math.floor(sparsity * i1)
                prune1 = ~_sorted_keep(sal, count - k)
            else:
                k = math.floor(sparsity * rows * i2) - math.floor(sparsity * rows * i1)
                prune1 = ~_sorted_keep(sal.reshape(1, -1), rows * count - k).reshape(rows, count)
        elif pattern == "hybrid":
            is_topk = per_weight_tier[:, i1:i2] == TOPK
            if is_topk.any():
                prune1 = is_topk & ~topk_block_mask(saliency(W1, d1, i1), block_size, topk_per_block)
        nm_rows = None
        if pattern == "hybrid":
            nm_rows = per_weight_tier[:, i1:i2] == NM
        if old is not None:
            prune1 |= ~old[:, i1:i2]
        if native and W1.device.type == "cpu":
            nm_n, nm_m = (n_keep, m) if pattern in ("nm", "hybrid") else (0, 0)
            chunk_old = None if old is None else old[:, i1:i2].contiguous()
            torch.ops.hf_hybrid_sparse.sparsegpt_chunk(
                W1, hinv1.contiguous(), prune1, Err1, nm_n, nm_m, nm_rows, chunk_old
            )
            W[:, i1:i2] = W1 * ~prune1
            keep[:, i1:i2] = ~prune1
            if i2 < cols:
                W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]
            continue
        # err_i = (w_i - q_i) / d_i = w_i * prune_i / d_i: one scale per weight, refreshed when N:M picks a group
        scale = prune1.to(W1.dtype) / d1.unsqueeze(0)
        for i in range(count):
            if pattern in ("nm", "hybrid") and i % m == 0:
                group_keep = _sorted_keep(saliency(W1[:, i : i + m], d1[i : i + m], i1 + i), n_keep)
                new_prune = ~group_keep
                if nm_rows is not None:
                    new_prune &= nm_rows[:, i : i + m]
                prune1[:, i : i + m] |= new_prune
                scale[:, i : i + m] = prune1[:, i : i + m].to(W1.dtype) / d1[i : i + m].unsqueeze(0)
            err = torch.mul(W1[:, i], scale[:, i], out=Err1[:, i])
            # the OBS update of this and the later columns; column i becomes q_i (pruned: ~0, zeroed below)
            W1[:, i:].addr_(err, hinv1[i, i:], alpha=-1.0)
        W[:, i1:i2] = W1 * ~prune1
        keep[:, i1:i2] = ~prune1
        if i2 < cols:
            W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]
    if not torch.isfinite(W).all():
        raise PruningError("SparseGPT produced non-finite weights; raise `dampening`.")
    return W, keep, tiers
