"""Writing the sparsity state into a state dict and its safetensors header (format: :mod:`.format`)."""

from __future__ import annotations

from typing import Any

import torch

from ..bits import pack_bits
from ..errors import StorageError
from ..kernels.linear import HybridSparseLinear
from ..state import iter_sparse_params, revived_weights
from .format import INDEX_KEY, MASK_PREFIX, METADATA_KEY, encode_mask_index, encode_metadata, encode_tier_map
from .reader import non_dense


def sparse_state_dict(
    model: torch.nn.Module, recipe: dict[str, Any], compressed: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``model.state_dict()`` plus the packed masks (and, compressed, kept values instead of dense
    weights), and the header metadata ``{"hybrid_sparse": json}`` describing them.

    Refuses (before anything is written) a model whose pruned weights are not all zero.
    """
    revived = revived_weights(model)
    if revived:
        listed = ", ".join(f"{k} ({v})" for k, v in list(revived.items())[:3])
        raise StorageError(
            f"{sum(revived.values())} pruned weights are not zero in {len(revived)} parameter(s): {listed}. Something "
            "changed them outside the mask guards (a hand-written update under torch.no_grad, an optimizer that moves "
            "weights without gradients). Nothing was written. Call hf_hybrid_sparse.apply_masks(model) to zero them "
            "(then evaluate the model again), or prune again."
        )
    state_dict = model.state_dict()
    entries = [(f"{n}.{p}" if n else p, s) for n, _, p, s in iter_sparse_params(model)]
    # packed layers are written in the normal layout: their dense weight, mask and tier map, derived
    for name, module in model.named_modules():
        if isinstance(module, HybridSparseLinear):
            prefix = f"{name}." if name else ""
            for buffer, _ in module.named_buffers(recurse=False):
                state_dict.pop(prefix + buffer, None)
            weight, state = module.param_state()
            state_dict[prefix + "weight"] = weight
            entries.append((prefix + "weight", state))
    modules = {}
    if compressed and any(s.mask.dim() == 3 for _, s in entries):
        raise StorageError(
            "compressed=True does not support fused MoE expert weights yet (transformers re-splits them per "
            "expert on save); save this model with the plain layout."
        )
    for index, (key, state) in enumerate(entries):
        mask_key = f"{MASK_PREFIX}{index:05d}"
        modules[key] = {
            "shape": list(state.mask.shape),
            "transposed": state.transposed,
            "pattern": state.pattern,
            "method": state.method,
            "block_size": state.block_size,
            "nm": state.nm,
            "topk_per_block": state.topk_per_block,
            "numel": state.mask.numel(),
            "kept": int(state.mask.sum()),
            "mask": mask_key,
            "values": None,
            "tier_map": None if state.tier_map is None else encode_tier_map(state.tier_map),
        }
        if compressed and state.tier_map is not None:
            # DENSE blocks are all kept: their mask bits carry nothing, store only the others
            informative = non_dense(state.tier_map, state.block_size, state.transposed, state.mask.shape)
            state_dict[mask_key] = pack_bits(state.mask.cpu()[informative])
            modules[key]["mask_scope"] = "nondense"
        else:
            state_dict[mask_key] = pack_bits(state.mask)
        if compressed:
            weight = state_dict[key]
            state_dict[key] = weight[state.mask.to(weight.device)].contiguous()
            modules[key]["values"] = key
    return state_dict, {METADATA_KEY: encode_metadata(recipe, modules), INDEX_KEY: encode_mask_index(modules)}
