import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from hf_hybrid_sparse.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _prune_quietly(checkpoint, out, *extra):
    """`prune` a tiny checkpoint with small calibration and no evaluation into ``out``."""
    args = [
        "prune",
        "--model",
        str(checkpoint),
        "--nsamples",
        "4",
        "--seqlen",
        "64",
        "--skip_eval",
        "--save",
        str(out),
    ]
    assert main([*args, *extra]) == 0


def test_prune_command_end_to_end(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main(
        [
            "prune",
            "--model",
            str(tiny_checkpoint),
            "--method",
            "wanda",
            "--pattern",
            "hybrid",
            "--nsamples",
            "4",
            "--seqlen",
            "64",
            "--eval_seqlen",
            "64",
            "--eval_windows",
            "2",
            "--save",
            str(out),
            "--report_json",
            str(tmp_path / "r.json"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "perplexity before:" in printed and "perplexity after:" in printed and "**total**" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["perplexity_before"] > 0 and report["perplexity_after"] > 0
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    w = reloaded.model.layers[1].mlp.down_proj.weight
    assert abs((w == 0).float().mean().item() - report["sparsity"]) < 0.01
    assert (out / "hybrid_sparse_report.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned.tmp")]


def test_prune_command_rejects_bad_recipe_before_loading(capsys):
    code = main(["prune", "--model", "/does/not/exist", "--tier_ratios", "0.5,0.5,0.5"])
    assert code == 2
    assert "sum to 1.5" in capsys.readouterr().err


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "usage: hf-hybrid-sparse" in capsys.readouterr().err


def test_console_script_help():
    res = subprocess.run(
        [sys.executable, "-m", "hf_hybrid_sparse.cli", "prune", "--help"], capture_output=True, text=True
    )
    assert res.returncode == 0 and "--tier_ratios" in res.stdout and "--method" in res.stdout


def test_example_prune_any_architecture_runs():
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "prune_any_architecture.py")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [ln for ln in res.stdout.splitlines() if "sparse" in ln]
    assert len(lines) == 4 and all("tier maps" in ln for ln in lines)


@pytest.mark.parametrize("lora", ["0", "4"])
def test_finetune_command(tiny_checkpoint, tmp_path, capsys, lora):
    pruned = tmp_path / "pruned"
    _prune_quietly(tiny_checkpoint, pruned, "--pattern", "2:4")
    out = tmp_path / "ft"
    code = main(
        [
            "finetune",
            "--model",
            str(pruned),
            "--seqlen",
            "64",
            "--max_samples",
            "16",
            "--eval_windows",
            "2",
            "--lora_r",
            lora,
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            "1e-3",
            "--use_cpu",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "perplexity before:" in printed and "perplexity after:" in printed
    from hf_hybrid_sparse import sparsity_masks

    reloaded = AutoModelForCausalLM.from_pretrained(out / "final")
    masks = sparsity_masks(reloaded)
    assert len(masks) == 14
    for name, p in reloaded.named_parameters():
        if name in masks:
            assert (p[~masks[name]] == 0).all()
            assert (masks[name].reshape(p.shape[0], -1, 4).sum(-1) == 2).all()


def test_eval_command_side_by_side(tiny_checkpoint, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    _prune_quietly(tiny_checkpoint, pruned)
    capsys.readouterr()
    out_json = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(pruned),
                "--dense_model",
                str(tiny_checkpoint),
                "--seqlen",
                "64",
                "--max_windows",
                "2",
                "--json_out",
                str(out_json),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "| metric | dense |" in table and "ppl wiki_offline" in table
    data = json.loads(out_json.read_text())
    assert data["dense"]["ppl wiki_offline tokens"] == 2 * 63
    assert data["dense"]["ppl wiki_offline"] != data[str(pruned)]["ppl wiki_offline"]


def test_bench_command_on_cpu(capsys):
    assert main(["bench", "--e2e", "tiny", "--new_tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "| 4096x4096 | 32.0 | 20.1 | 0.629 |" in out
    assert "GPU timings: not measured" in out or "copy bandwidth" in out
    assert "e2e generate (tiny" in out
