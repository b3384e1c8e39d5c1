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


def _page_path(out: Path, page: int, pages: int) -> Path:
    return out if pages == 1 else out.with_name(f"{out.stem}-{page + 1}of{pages}{out.suffix}")


def _title(name: str) -> str:
    """``model.layers.12.self_attn.q_proj.weight`` -> ``layers.12\nself_attn.q_proj`` (whole, two lines)."""
    name = name.removesuffix(".weight").removeprefix("model.")
    head, _, tail = name.rpartition(".")
    parts = head.split(".")
    cut = 2 if len(parts) > 2 else len(parts)
    return ".".join(parts[:cut]) + "\n" + ".".join(parts[cut:] + [tail]).lstrip(".")


def plot_tier_maps(
    maps: dict[str, torch.Tensor], out_file: str | os.PathLike, modules_per_page: int = 28
) -> list[Path]:
    """Draw every ``{name: tier_map}`` (int8 ``[R, C]`` or per expert ``[E, R, C]``) into PNG pages.

    Each module is one panel at its true aspect ratio (one pixel per block), titled with its whole
    name; ``modules_per_page`` panels per page, pages named ``NAME-1ofN.png``... when there is more
    than one. Returns the written paths.
    """
    if not maps:
        raise HybridSparseError("no tier maps to draw (the model was not pruned with pattern='hybrid').")
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colors = ["#1f4e79", "#f0a030", "#e8e8e8"]  # DENSE, NM, TOPK
    cmap = ListedColormap(colors)
    names = list(maps)
    pages = (len(names) + modules_per_page - 1) // modules_per_page
    out, written = Path(out_file), []
    for page in range(pages):
        chunk = names[page * modules_per_page : (page + 1) * modules_per_page]
        cols = min(7, len(chunk))
        rows = (len(chunk) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows + 0.6), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, name in zip(axes.flat, chunk):
            tm = maps[name]
            image = tm.reshape(-1, tm.shape[-1]) if tm.dim() == 3 else tm
            ax.imshow(image.numpy(), cmap=cmap, vmin=0, vmax=2, interpolation="nearest", aspect="equal")
            ax.set_title(_title(name) + f"\n{image.shape[0]}x{image.shape[1]} blocks", fontsize=6)
        handles = [Patch(color=c, label=t) for c, t in zip(colors, ("DENSE", "NM", "TOPK"))]
        fig.legend(handles=handles, loc="upper right", fontsize=7, ncol=3, frameon=False)
        fig.suptitle(
            f"tier maps, page {page + 1} of {pages} ({len(names)} modules)", fontsize=8, x=0.02, ha="left"
        )
        written.append(_save(fig, _page_path(out, page, pages)))
    return written


def plot_progress(
    summary: list[dict[str, Any]],
    out_file: str | os.PathLike,
    metric: str = "perplexity",
    dense: dict[str, float] | None = None,
) -> Path:
    """Plot ``metric`` and sparsity across the iterations of a progressive run (``dense``: the baseline)."""
    plt = _pyplot()
    xs = [s["iteration"] for s in summary]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    lines = []
    if all(metric in s for s in summary):
        lines += ax.plot(xs, [s[metric] for s in summary], "o-", color="#1f4e79", label=f"{metric} (pruned)")
        ax.set_ylabel(metric)
        if dense is not None and metric in dense:
            lines.append(ax.axhline(dense[metric], color="#1f4e79", ls=":", label=f"{metric} (dense model)"))
    ax2 = ax.twinx()
    lines += ax2.plot(xs, [100 * s["sparsity"] for s in summary], "s--", color="gray", label="sparsity %")
    ax2.set_ylabel("sparsity %")
    ax.set_xlabel("iteration")
    ax.set_xticks(xs)
    ax.legend(handles=lines, fontsize=7, loc="upper left")
    return _save(fig, out_file)
