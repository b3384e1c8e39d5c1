"""Model cards and ``push_to_hub`` for pruned models; reading a saved model's sparsity without its weights."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .patterns import TIER_NAMES
from .serialization import StorageError

TEMPLATE_NAME = "hybrid_sparse.md"


def _template_text(template: str | os.PathLike | None) -> str:
    if template is not None:
        return Path(template).read_text(encoding="utf-8")
    try:
        from importlib.resources import files

        return files("hf_hybrid_sparse.model_cards").joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        # source checkout / editable install: the templates sit at the repository's top level
        return (Path(__file__).resolve().parents[2] / "model_cards" / TEMPLATE_NAME).read_text(
            encoding="utf-8"
        )


def read_sparsity_summary(directory: str | os.PathLike) -> dict[str, Any]:
    """Recipe and per-module sparsity/tier counts of a saved model, from safetensors headers only.

    Reads no weight data, so it is fast for any model size. Raises :class:`StorageError` when the
    folder holds no hybrid-sparse metadata.
    """
    from .quantizer import read_metadata

    folder = Path(directory)
    files = sorted(str(p) for p in folder.glob("*.safetensors"))
    if not files:
        raise StorageError(f"{folder} contains no .safetensors files.")
    doc = read_metadata(files)
    if doc is None:
        raise StorageError(f"{folder} has no hybrid-sparse metadata (was it saved by hf-hybrid-sparse?).")
    layers = []
    totals = {name: 0 for name in TIER_NAMES.values()}
    kept = numel = 0
    for name, entry in doc["modules"].items():
        row = {
            "name": name,
            "shape": "x".join(map(str, entry["shape"])),
            "sparsity": 1 - entry["kept"] / entry["numel"],
        }
        tiers = entry["tier_map"]
        for code, tier in TIER_NAMES.items():
            count = int((tiers == code).sum()) if tiers is not None else None
            row[tier] = "" if count is None else count
            totals[tier] += count or 0
        layers.append(row)
        kept += entry["kept"]
        numel += entry["numel"]
    return {
        "recipe": doc["recipe"],
        "layers": layers,
        "tier_totals": totals,
        "overall_sparsity": 1 - kept / numel if numel else 0.0,
        "tier_maps": {name: e["tier_map"] for name, e in doc["modules"].items() if e["tier_map"] is not None},
    }


def render_model_card(
    directory: str | os.PathLike,
    repo_id: str,
    base_model: str | None = None,
    metrics: dict[str, float] | None = None,
    template: str | os.PathLike | None = None,
) -> str:
    """The README.md of a pruned model folder, rendered from ``model_cards/`` (jinja2)."""
    import jinja2

    from . import __version__

    summary = read_sparsity_summary(directory)
    recipe = summary["recipe"]
    card_data: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": [
            "hf-hybrid-sparse",
            "pruned",
            "sparse",
            recipe.get("method", "pruned"),
            str(recipe.get("pattern")),
        ],
    }
    if base_model:
        card_data["base_model"] = base_model
    if metrics:
        card_data["model-index"] = [
            {
                "name": repo_id.split("/")[-1],
                "results": [
                    {
                        "task": {"type": "text-generation", "name": "Text generation"},
                        "dataset": {
                            "type": "wiki_offline",
                            "name": "offline Wikipedia summaries (test split)",
                        },
                        "metrics": [{"type": k, "value": float(v), "name": k} for k, v in metrics.items()],
                    }
                ],
            }
        ]
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    text = env.from_string(_template_text(template)).render(
        card_data=yaml.safe_dump(card_data, sort_keys=False).strip(),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        base_model=base_model,
        package_version=__version__,
        recipe=recipe,
        recipe_rows=[(k, v) for k, v in recipe.items() if k != "quant_method"],
        overall_sparsity=summary["overall_sparsity"],
        tier_totals=summary["tier_totals"],
        metrics=metrics or {},
        layers=summary["layers"],
    )
    return text


def push_to_hub(
    model: Any,
    repo_id: str,
    tokenizer: Any = None,
    base_model: str | None = None,
    metrics: dict[str, float] | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload hybrid-sparse model",
    compressed: bool = False,
) -> Any:
    """Save ``model`` (masks, tier maps, recipe), its tokenizer and a model card, and upload the folder.

    Needs network access and a Hub token (``token=`` or ``huggingface-cli login``). Returns what
    ``HfApi.upload_folder`` returns.
    """
    from huggingface_hub import HfApi, ModelCard

    from .storage import save_pretrained

    with tempfile.TemporaryDirectory(prefix="hf-hybrid-sparse-push-") as tmp:
        folder = Path(tmp) / "model"
        save_pretrained(model, folder, compressed=compressed)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        card = render_model_card(folder, repo_id, base_model=base_model, metrics=metrics)
        ModelCard(card)  # parses the YAML block: malformed metadata fails here, before any upload
        (folder / "README.md").write_text(card, encoding="utf-8")
        if metrics:
            (folder / "hybrid_sparse_metrics.json").write_text(json.dumps(metrics, indent=2))
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)


def plot_tier_maps(source: Any, out_file: str | os.PathLike, max_modules: int = 28) -> Path:
    """Draw tier maps into an image (needs the ``[viz]`` extra: matplotlib).

    ``source`` is a saved model folder, a pruned model, or a ``{name: tier_map}`` dict.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError:
        raise ImportError(
            "Plotting tier maps needs matplotlib: pip install 'hf-hybrid-sparse[viz]'"
        ) from None
    if isinstance(source, dict):
        maps = source
    elif isinstance(source, (str, os.PathLike)):
        maps = read_sparsity_summary(source)["tier_maps"]
    else:
        from .engine import tier_maps

        maps = tier_maps(source)
    if not maps:
        raise StorageError("no tier maps to draw (the model was not pruned with pattern='hybrid').")
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
    fig.tight_layout()
    out = Path(out_file)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
