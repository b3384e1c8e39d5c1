"""Where a module computes: the one rule every part uses (accelerate hooks, offloaded ``meta`` weights)."""

from __future__ import annotations

import torch
from torch import nn


def parameter_device(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter that is not on ``meta`` (``None`` if all are)."""
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return None


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` runs: its accelerate hook's execution device, else its first real parameter's, else CPU."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return parameter_device(module) or torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's token ids should go: where its input embedding runs (the model's device otherwise)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and (getattr(emb, "_hf_hook", None) is not None or parameter_device(emb) is not None):
        return execution_device(emb)
    return execution_device(model)
