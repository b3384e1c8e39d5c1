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


def test_model_card_metadata_parses(saved):
    folder, _, report = saved
    text = render_model_card(
        folder, "someone/tiny-hybrid", base_model="someone/tiny", metrics={"perplexity": 12.5}
    )
    card = ModelCard(text)
    assert card.data.base_model == "someone/tiny"
    assert card.data.eval_results[0].metric_value == 12.5
    assert "hf-hybrid-sparse" in card.data.tags
    assert "model.layers.0.self_attn.q_proj.weight" in text and f"{100 * report.sparsity:.2f}%" in text


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
    assert push_to_hub(model, "me/tiny-hybrid", metrics={"perplexity": 3.0}) == "uploaded"
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
