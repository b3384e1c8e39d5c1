"""Writing the sparsity state into a state dict and its safetensors header (format: :mod:`.format`)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ..bits import pack_bits
from ..errors import StorageError
from ..hostops import popcount, select
from ..kernels.linear import HybridSparseLinear
from ..state import ParamSparsity, checkable_weight, iter_sparse_params, revived_count
from .format import INDEX_KEY, MASK_PREFIX, METADATA_KEY, encode_mask_index, encode_metadata, encode_tier_map
from .reader import native_counts, non_dense


def _kept_and_revived(param: Any, state: ParamSparsity, bits: np.ndarray) -> tuple[int, int]:
    """Kept weights of the mask (``bits``, packed) and pruned weights of ``param`` that are not zero, in one
    pass of the extension where it is built (:func:`.reader.native_counts`); a parameter that
    :func:`~hf_hybrid_sparse.state.checkable_weight` leaves out has nothing to check."""
    weight = checkable_weight(param, state)
    counts = native_counts({"shape": state.shape, "tier_map": None, "topk_per_block": 0}, weight, bits, False)
    if counts is not None:
        return counts[0], counts[1]
    return int(popcount(bits).sum(dtype=np.int64)), revived_count(weight, state, bits)


def sparse_state_dict(
    model: torch.nn.Module, recipe: dict[str, Any], compressed: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``model.state_dict()`` plus the packed masks (and, compressed, kept values instead of dense
    weights), and the header metadata ``{"hybrid_sparse": json}`` describing them.

    Refuses (before anything is written) a model whose pruned weights are not all zero.
    """
    state_dict = model.state_dict()
    # (state dict key, state, the parameter whose zeros the save checks: packed layers derive theirs)
    entries = [(f"{n}.{p}" if n else p, s, getattr(m, p, None)) for n, m, p, s in iter_sparse_params(model)]
    # packed layers are written in the normal layout: their dense weight, mask and tier map, derived
    for name, module in model.named_modules():
        if isinstance(module, HybridSparseLinear):
            prefix = f"{name}." if name else ""
            for buffer, _ in module.named_buffers(recurse=False):
                state_dict.pop(prefix + buffer, None)
            weight, state = module.param_state()
            state_dict[prefix + "weight"] = weight
            entries.append((prefix + "weight", state, None))
    modules = {}
    if compressed and any(s.mask.dim() == 3 for _, s, _ in entries):
        raise StorageError(
            "compressed=True does not support fused MoE expert weights yet (transformers re-splits them per "
            "expert on save); save this model with the plain layout."
        )

    def stored(job: tuple[str, ParamSparsity, Any]) -> tuple[int, int, torch.Tensor, torch.Tensor | None]:
        """Revived count, kept count, packed mask and (compressed) kept values of one entry; reading every
        pruned weight is most of a save's own work, so entries run on threads (NumPy and the extension release
        the GIL)."""
        key, state, param = job
        bits = state.packed_bits()
        kept, revived = _kept_and_revived(param, state, bits)
        if revived:
            return revived, 0, None, None
        packed = torch.from_numpy(bits)
        if compressed and state.tier_map is not None:
            # DENSE blocks are all kept: their mask bits carry nothing, store only the others
            informative = non_dense(state.tier_map, state.block_size, state.transposed, state.mask.shape)
            packed = pack_bits(select(state.mask, informative))
        return 0, kept, packed, select(state_dict[key], state.mask) if compressed else None

    workers = max(1, min(torch.get_num_threads(), len(entries)))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(stored, entries))
    revived = {key: r[0] for (key, _, _), r in zip(entries, results) if r[0]}
    if revived:
        listed = ", ".join(f"{k} ({v})" for k, v in list(revived.items())[:3])
        raise StorageError(
            f"{sum(revived.values())} pruned weights are not zero in {len(revived)} parameter(s): {listed}. Something "
            "changed them outside the mask guards (a hand-written update under torch.no_grad, an optimizer that moves "
            "weights without gradients). Nothing was written. Call hf_hybrid_sparse.apply_masks(model) to zero them "
            "(then evaluate the model again), or prune again."
        )
    for index, ((key, state, _), (_, kept, packed, values)) in enumerate(zip(entries, results)):
        mask_key = f"{MASK_PREFIX}{index:05d}"
        modules[key] = {
            "shape": list(state.shape),
            "transposed": state.transposed,
            "pattern": state.pattern,
            "method": state.method,
            "block_size": state.block_size,
            "nm": state.nm,
            "topk_per_block": state.topk_per_block,
            "numel": math.prod(state.shape),
            "kept": kept,
            "mask": mask_key,
            "values": None,
            "tier_map": None if state.tier_map is None else encode_tier_map(state.tier_map),
        }
        state_dict[mask_key] = packed
        if compressed and state.tier_map is not None:
            modules[key]["mask_scope"] = "nondense"
        if compressed:
            state_dict[key] = values
            modules[key]["values"] = key
    return state_dict, {METADATA_KEY: encode_metadata(recipe, modules), INDEX_KEY: encode_mask_index(modules)}
