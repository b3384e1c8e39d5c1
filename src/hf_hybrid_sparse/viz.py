"""Plots (extra ``[viz]``: matplotlib): tier maps of a pruned model, and a progressive run's curve."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import HybridSparseError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("Plotting needs matplotlib: pip install 'hf-hybrid-sparse[viz]'") from None
    return plt


def _save(fig: Any, out_file: str | os.PathLike) -> Path:
    """Write ``fig`` to ``out_file`` and close it."""
    plt = _pyplot()
    out = Path(out_file)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_tier_maps(maps: dict[str, torch.Tensor], out_file: str | os.PathLike, max_modules: int = 28) -> Path:
    """Draw ``{name: tier_map}`` (int8 ``[R, C]`` or per expert ``[E, R, C]``) into an image."""
    if not maps:
        raise HybridSparseError("no tier maps to draw (the model was not pruned with pattern='hybrid').")
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    names = list(maps)[:max_modules]
    cols = min(7, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows), squeeze=False)
    cmap = ListedColormap(["#1f4e79", "#f0a030", "#e8e8e8"])  # DENSE, NM, TOPK
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        tm = maps[name]
        image = tm.reshape(-1, tm.shape[-1]) if tm.dim() == 3 else tm
        ax.imshow(image.numpy(), cmap=cmap, vmin=0, vmax=2, interpolation="nearest", aspect="auto")
        ax.set_title(name.replace(".weight", "")[-28:], fontsize=6)
    fig.suptitle("tier maps: dark = DENSE, orange = NM, light = TOPK", fontsize=8)
    return _save(fig, out_file)


def plot_progress(
    summary: list[dict[str, Any]], out_file: str | os.PathLike, metric: str = "perplexity"
) -> Path:
    """Plot ``metric`` and sparsity across the iterations of a progressive run."""
    plt = _pyplot()
    xs = [s["iteration"] for s in summary]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if all(metric in s for s in summary):
        ax.plot(xs, [s[metric] for s in summary], "o-", label=metric)
        ax.set_ylabel(metric)
    ax2 = ax.twinx()
    ax2.plot(xs, [100 * s["sparsity"] for s in summary], "s--", color="gray", label="sparsity %")
    ax2.set_ylabel("sparsity %")
    ax.set_xlabel("iteration")
    ax.set_xticks(xs)
    return _save(fig, out_file)
