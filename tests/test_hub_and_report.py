import json

import pytest
import torch
from huggingface_hub import ModelCard
from tiny_models import random_tokens, tiny_model

from hf_hybrid_sparse import HybridSparseConfig, StorageError, apply_hybrid_sparsity
from hf_hybrid_sparse.checkpoint.hub import push_to_hub, render_model_card
from hf_hybrid_sparse.checkpoint.reader import read_sparsity_summary
from hf_hybrid_sparse.cli import main


@pytest.fixture
def saved(tmp_path):
    model = tiny_model("llama")
    report = apply_hybrid_sparsity(model, HybridSparseConfig(nsamples=4, seqlen=32), random_tokens(4, 32))
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m", model, report


def test_summary_from_headers_matches_the_report(saved):
    folder, _, report = saved
    summary = read_sparsity_summary(folder)
    assert abs(summary["overall_sparsity"] - report.sparsity) < 1e-12
    assert summary["tier_totals"] == report.tier_totals()
    assert len(summary["layers"]) == len(report.modules)


def test_report_command_table_and_json(saved, capsys):
    folder, _, report = saved
    assert main(["report", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"sparsity {report.sparsity:.2%}" in out and "model.layers.1.mlp.down_proj.weight" not in out
    assert main(["report", str(folder), "--table"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj.weight" in out and f"{report.sparsity:.2%}" in out
    assert main(["report", str(folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recipe"]["method"] == "wanda"


def test_report_command_plot(saved, tmp_path):
    pytest.importorskip("matplotlib", reason="plots need the [viz] extra")
    folder, _, _ = saved
    png = tmp_path / "tiers.png"
    assert main(["report", str(folder), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_report_on_a_plain_folder_fails_clearly(tmp_path, capsys):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "plain")
    assert main(["report", str(tmp_path / "plain")]) == 2
    assert "no hybrid-sparse metadata" in capsys.readouterr().err
    with pytest.raises(StorageError):
        read_sparsity_summary(tmp_path)


def test_model_card_metadata_round_trips_through_model_card_load(saved, tmp_path):
    folder, _, report = saved
    metrics = {"perplexity": 12.5, "c4 perplexity": {"value": 20.25, "dataset": "c4", "type": "perplexity"}}
    text = render_model_card(
        folder, "someone/tiny-hybrid", base_model="someone/tiny", metrics=metrics, eval_dataset="wikitext2"
    )
    (tmp_path / "README.md").write_text(text)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "someone/tiny"
    assert "hf-hybrid-sparse" in card.data.tags and "hybrid" in card.data.tags
    wiki, c4 = card.data.eval_results
    assert (wiki.metric_value, wiki.dataset_type, wiki.dataset_config, wiki.dataset_split) == (
        12.5,
        "Salesforce/wikitext",
        "wikitext-2-raw-v1",
        "test",
    )
    assert (c4.metric_value, c4.metric_type, c4.dataset_type, c4.dataset_split) == (
        20.25,
        "perplexity",
        "allenai/c4",
        "validation",
    )
    assert "model.layers.0.self_attn.q_proj.weight" in text and f"{100 * report.sparsity:.2f}%" in text
    assert "http" not in text  # no links that could be dead
    # a hybrid model's target `sparsity` field is unused: the card shows the measured figure only
    assert "| `sparsity` |" not in text and "| measured sparsity |" in text
    with pytest.raises(StorageError, match="eval_dataset="):
        render_model_card(folder, "someone/tiny-hybrid", metrics={"perplexity": 1.0})


def test_save_model_card_and_offline_push_fail_in_one_line(saved, monkeypatch, tmp_path):
    from huggingface_hub import HfApi

    from hf_hybrid_sparse.checkpoint.hub import save_model_card

    folder, model, _ = saved
    path = save_model_card(folder, "me/tiny-hybrid", metrics={"ppl": 3.0}, eval_dataset="wiki_offline")
    assert ModelCard.load(path).data.eval_results[0].dataset_type == "wiki_offline"

    def offline(self, *args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known\n  ...traceback lines...")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    with pytest.raises(StorageError) as err:
        push_to_hub(model, "me/tiny-hybrid")
    assert "Could not upload to the Hub repo 'me/tiny-hybrid' (ConnectionError" in str(err.value)
    assert "\n" not in str(err.value) and "dry_run" in str(err.value)
    out = push_to_hub(model, "me/tiny-hybrid", dry_run=tmp_path / "staged")
    assert (out / "README.md").exists() and (out / "model.safetensors").exists()


def test_push_to_hub_up_to_the_upload_call(saved, monkeypatch):
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM

    _, model, _ = saved
    seen = {}

    def fake_create_repo(self, repo_id, **kw):
        seen["repo"] = repo_id

    def fake_upload_folder(self, repo_id, folder_path, **kw):
        from pathlib import Path

        folder = Path(folder_path)
        seen["files"] = sorted(p.name for p in folder.iterdir())
        seen["card"] = (folder / "README.md").read_text()
        seen["reloaded"] = AutoModelForCausalLM.from_pretrained(folder)
        return "uploaded"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    result = push_to_hub(model, "me/tiny-hybrid", metrics={"perplexity": 3.0}, eval_dataset="wikitext2")
    assert result == "uploaded"
    assert seen["repo"] == "me/tiny-hybrid"
    assert {"README.md", "config.json", "model.safetensors", "hybrid_sparse_metrics.json"} <= set(
        seen["files"]
    )
    assert ModelCard(seen["card"]).data.tags[0] == "hf-hybrid-sparse"
    masks = seen["reloaded"].model.layers[0].mlp.up_proj.hf_hybrid_sparse["weight"].mask
    assert torch.equal(masks, model.model.layers[0].mlp.up_proj.hf_hybrid_sparse["weight"].mask)


def test_model_card_says_which_layout_needs_the_package(saved, tmp_path):
    from hf_hybrid_sparse import save_pretrained

    folder, model, _ = saved
    plain = render_model_card(folder, "someone/tiny-hybrid")
    assert "loads with plain `transformers`" in plain and "needs `hf-hybrid-sparse` to load" not in plain
    save_pretrained(model, tmp_path / "c", compressed=True)
    compressed = render_model_card(tmp_path / "c", "someone/tiny-hybrid")
    assert (
        "needs `hf-hybrid-sparse` to load" in compressed
        and "loads with plain `transformers`" not in compressed
    )
