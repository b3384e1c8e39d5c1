"""Model cards and ``push_to_hub`` for pruned models."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ..version import __version__
from .reader import read_sparsity_summary
from .saving import save_pretrained

TEMPLATE_NAME = "hybrid_sparse.md"


def _template_text(template: str | os.PathLike | None) -> str:
    if template is not None:
        return Path(template).read_text(encoding="utf-8")
    try:
        from importlib.resources import files

        return files("hf_hybrid_sparse.model_cards").joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        # source checkout / editable install: the templates sit at the repository's top level
        return (Path(__file__).resolve().parents[3] / "model_cards" / TEMPLATE_NAME).read_text(
            encoding="utf-8"
        )


def render_model_card(
    directory: str | os.PathLike,
    repo_id: str,
    base_model: str | None = None,
    metrics: dict[str, float] | None = None,
    template: str | os.PathLike | None = None,
) -> str:
    """The README.md of a pruned model folder, rendered from ``model_cards/`` (jinja2)."""
    import jinja2

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
        compressed=summary["compressed"],
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
