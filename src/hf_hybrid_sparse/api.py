"""The one entry point: prune a model with the engine and make it carry its recipe and quantizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .checkpoint.quantizer import attach, release_dequantized_gguf
from .config import HybridSparseConfig
from .data.calibration import DEFAULT_CALIBRATION
from .engine.report import SparsityReport
from .engine.sequential import prune_model
from .errors import PruningError
from .logs import get_logger
from .state import iter_sparse_params

logger = get_logger(__name__)


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

    The masks and tier maps are left on the modules (:mod:`hf_hybrid_sparse.state`); the recipe goes
    to ``model.config.quantization_config`` and a quantizer to ``model.hf_quantizer``, so
    ``save_pretrained`` writes them and ``from_pretrained`` restores them.
    """
    config = config or HybridSparseConfig()
    release_dequantized_gguf(model)  # a GGUF file loaded dequantised prunes and saves like any model
    try:
        report = prune_model(model, config, calib_dataset, tokenizer, previous_tier_maps)
    except PruningError:
        # the blocks finished before the failure carry their state: keep it savable and enforced
        if any(True for _ in iter_sparse_params(model)):
            attach(model, config)
        raise
    if not attach(model, config):
        logger.warning(
            "The model is quantized by another method: its sparsity state will not be saved with it."
        )
    logger.info(
        f"Pruned {len(report.modules)} weights to {report.sparsity:.2%} sparsity in {report.seconds:.1f} s"
    )
    return report
