"""Model cards (``huggingface_hub.ModelCard`` / ``ModelCardData`` / ``EvalResult``) and ``push_to_hub``.

The card's metadata is built with ``ModelCardData`` (Hub-valid ``model-index``, ``base_model``,
``tags``), its body rendered from the template in ``model_cards/`` by ``ModelCard.from_template``.
Every metric names the dataset it was measured on: either per metric
(``{"perplexity": {"value": 15.1, "dataset": "wikitext2"}}``) or for all plain numbers with
``eval_dataset=``; names of the package's corpora map to their Hub ids (:func:`dataset_card_entry`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..data.calibration import OFFLINE_ALIASES, OFFLINE_TITLE
from ..data.corpora import SOURCES
from ..errors import StorageError, first_line
from ..version import __version__
from .reader import read_sparsity_summary
from .saving import save_pretrained

TEMPLATE_NAME = "hybrid_sparse.md"
CARD_FILE = "README.md"


def dataset_card_entry(name: str) -> tuple[str, str, str | None, str]:
    """``(dataset id, display name, config, split)`` of a metric's dataset for the card's model-index.

    The package's corpora map to their Hub ids and evaluation splits (:data:`..data.corpora.SOURCES`);
    any other name is taken as a Hub id evaluated on ``test``.
    """
    if name in OFFLINE_ALIASES:
        return "wiki_offline", f"{OFFLINE_TITLE} (test split)", None, "test"
    spec = SOURCES.get(name)
    if spec is None:
        return name, name, None, "test"
    return spec["path"], spec["title"], spec.get("config", spec.get("subset")), spec["eval_split"]


# recipe fields that say nothing about a checkpoint's pattern (or only how it is loaded)
_NOT_RECIPE = ("quant_method", "use_kernels")


def _template_path(template: str | os.PathLike | None) -> str:
    if template is not None:
        return str(template)
    try:
        from importlib.resources import files

        path = files("hf_hybrid_sparse.model_cards").joinpath(TEMPLATE_NAME)
        if path.is_file():
            return str(path)
    except ModuleNotFoundError:
        pass
    # source checkout / editable install: the templates sit at the repository's top level
    return str(Path(__file__).resolve().parents[3] / "model_cards" / TEMPLATE_NAME)


def _eval_results(metrics: dict[str, Any], eval_dataset: str | None) -> list:
    from huggingface_hub import EvalResult

    results = []
    for name, value in metrics.items():
        spec = value if isinstance(value, dict) else {"value": value, "dataset": eval_dataset}
        dataset = spec.get("dataset")
        if dataset is None:
            raise StorageError(
                f"metric {name!r} does not say which dataset it was measured on: pass "
                "eval_dataset='wikitext2' (for every plain number) or {'value': v, 'dataset': NAME}."
            )
        hub_id, display, config, split = dataset_card_entry(dataset)
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="Text generation",
                dataset_type=hub_id,
                dataset_name=display,
                dataset_config=config,
                dataset_split=spec.get("split", split),
                metric_type=str(spec.get("type", name)),
                metric_name=name,
                metric_value=float(spec["value"]),
            )
        )
    return results


def _recipe_rows(recipe: dict[str, Any]) -> list[tuple[str, Any]]:
    """The recipe fields that apply to this pattern (a hybrid model's target ``sparsity`` is unused)."""
    pattern = str(recipe.get("pattern"))
    unused = set(_NOT_RECIPE)
    if pattern == "hybrid" or ":" in pattern:
        unused.add("sparsity")
    if pattern != "hybrid":
        unused |= {"tier_ratios", "tier_group", "topk_per_block", "tier_rule"}
    if recipe.get("layer_allocation", "uniform") == "uniform":
        unused |= {"owl_threshold", "owl_lambda"}
    return [(k, v) for k, v in recipe.items() if k not in unused]


def build_model_card(
    directory: str | os.PathLike,
    repo_id: str,
    base_model: str | None = None,
    metrics: dict[str, Any] | None = None,
    eval_dataset: str | None = None,
    template: str | os.PathLike | None = None,
):
    """The ``huggingface_hub.ModelCard`` of a saved pruned model folder (real recipe and sparsity).

    Args:
        directory: folder written by ``save_pretrained`` of a pruned model.
        repo_id: where the card will live (``owner/name``), used in the usage snippet.
        base_model: Hub id of the dense model (``base_model`` metadata).
        metrics: ``{name: value}`` or ``{name: {"value", "dataset", "split"?, "type"?}}``.
        eval_dataset: dataset of every plain-number metric (a corpus name or a Hub id).
        template: a custom Jinja template (default: ``model_cards/hybrid_sparse.md``).
    """
    from huggingface_hub import ModelCard, ModelCardData

    summary = read_sparsity_summary(directory)
    recipe = summary["recipe"]
    model_name = repo_id.split("/")[-1]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base_model,
        tags=["hf-hybrid-sparse", "pruned", "sparse", str(recipe.get("method")), str(recipe.get("pattern"))],
        model_name=model_name,
        eval_results=_eval_results(metrics, eval_dataset) if metrics else None,
    )
    return ModelCard.from_template(
        data,
        template_path=_template_path(template),
        model_name=model_name,
        repo_id=repo_id,
        base_model=base_model,
        package_version=__version__,
        recipe=recipe,
        recipe_rows=_recipe_rows(recipe),
        overall_sparsity=summary["overall_sparsity"],
        compressed=summary["compressed"],
        tier_totals=summary["tier_totals"],
        metrics=_metric_rows(metrics or {}, eval_dataset),
        layers=summary["layers"],
    )


def _metric_rows(metrics: dict[str, Any], eval_dataset: str | None) -> list[tuple[str, str, str]]:
    rows = []
    for name, value in metrics.items():
        spec = value if isinstance(value, dict) else {"value": value, "dataset": eval_dataset}
        rows.append((name, f"{float(spec['value']):.4g}", str(spec.get("dataset"))))
    return rows


def render_model_card(
    directory: str | os.PathLike,
    repo_id: str,
    base_model: str | None = None,
    metrics: dict[str, Any] | None = None,
    eval_dataset: str | None = None,
    template: str | os.PathLike | None = None,
) -> str:
    """The README.md text of :func:`build_model_card`."""
    return str(build_model_card(directory, repo_id, base_model, metrics, eval_dataset, template))


def save_model_card(directory: str | os.PathLike, repo_id: str, **kwargs: Any) -> Path:
    """Write the model card as ``README.md`` into a saved folder (no network); returns its path."""
    card = build_model_card(directory, repo_id, **kwargs)
    path = Path(directory) / CARD_FILE
    card.save(str(path))
    return path


def push_to_hub(
    model: Any,
    repo_id: str,
    tokenizer: Any = None,
    base_model: str | None = None,
    metrics: dict[str, Any] | None = None,
    eval_dataset: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload hybrid-sparse model",
    compressed: bool = False,
    dry_run: str | os.PathLike | None = None,
) -> Any:
    """Save ``model`` (masks, tier maps, recipe), its tokenizer and a model card, and upload the folder.

    Needs network access and a Hub token (``token=`` or ``hf auth login``); without the Hub it fails
    with one :class:`StorageError` line. ``dry_run=FOLDER`` writes the exact folder that would be
    uploaded (card included) there instead and returns its path. Returns what
    ``HfApi.upload_folder`` returns.
    """
    from huggingface_hub import HfApi

    def stage(folder: Path) -> None:
        save_pretrained(model, folder, compressed=compressed)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        save_model_card(folder, repo_id, base_model=base_model, metrics=metrics, eval_dataset=eval_dataset)
        if metrics:
            (folder / "hybrid_sparse_metrics.json").write_text(json.dumps(metrics, indent=2))

    if metrics:
        _eval_results(metrics, eval_dataset)  # a metric without a dataset fails before any work
    if dry_run is not None:
        stage(Path(dry_run))
        return Path(dry_run)
    with tempfile.TemporaryDirectory(prefix="hf-hybrid-sparse-push-") as tmp:
        folder = Path(tmp) / "model"
        stage(folder)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
        except Exception as exc:  # noqa: BLE001 - network and auth errors come in many types: one line
            raise StorageError(
                f"Could not upload to the Hub repo {repo_id!r} ({type(exc).__name__}: {first_line(exc)}). Nothing was "
                "uploaded; check the network and `hf auth login`, or write the folder locally with "
                "push_to_hub(..., dry_run=FOLDER)."
            ) from None
