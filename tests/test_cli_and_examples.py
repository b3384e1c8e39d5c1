import json
import subprocess
import sys
from pathlib import Path

import pytest
from procs import subprocess_env
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
    assert "perplexity before:" in printed and "perplexity after:" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert f"sparsity {report['sparsity']:.2%}" in printed and "**total**" not in printed  # summary only
    assert "windows x" in printed and "predicted tokens" in printed  # the protocol beside the number
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
        [sys.executable, "-m", "hf_hybrid_sparse.cli", "prune", "--help"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert res.returncode == 0 and "--tier_ratios" in res.stdout and "--method" in res.stdout


def _run_example(name: str) -> str:
    """Run ``examples/NAME`` as a user would; returns its stdout (fails with its stderr's tail)."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        capture_output=True,
        text=True,
        timeout=600,
        env=subprocess_env(),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_example_prune_any_architecture_runs():
    stdout = _run_example("prune_any_architecture.py")
    lines = [ln for ln in stdout.splitlines() if "sparse" in ln]
    assert len(lines) == 4 and all("tier maps" in ln for ln in lines)


def test_example_distill_recovery_runs():
    stdout = _run_example("distill_recovery.py")
    line = next(ln for ln in stdout.splitlines() if ln.startswith("KL to the dense teacher"))
    before, after = (float(x) for x in line.split(": ")[1].split(";")[0].split(" -> "))
    assert after < before and line.endswith("revived: 0")
    assert "allocation: owl" in stdout


@pytest.mark.parametrize("lora,distill", [("0", False), ("4", False), ("0", True)])
def test_finetune_command(tiny_checkpoint, tmp_path, capsys, lora, distill):
    pruned = tmp_path / "pruned"
    _prune_quietly(tiny_checkpoint, pruned, "--pattern", "2:4")
    out = tmp_path / "ft"
    teacher = (
        ["--distill", "--teacher", str(tiny_checkpoint), "--distill_hidden_weight", "0.5"] if distill else []
    )
    code = main(
        ["finetune", *teacher]
        + [
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
            "--logging_steps",
            "1",
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
    assert ("distill_kl" in printed and "distill_hidden" in printed) == distill
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


def _design_packed_bytes(out_f, in_f, ratios=(0.35, 0.45, 0.20), k=15):
    """Bytes of the packed format as the design states them (fp16 values), independent of the packer."""
    from hf_hybrid_sparse.pruning.patterns import tier_counts

    n_dense, n_nm, n_topk = tier_counts((out_f // 16) * (in_f // 16), ratios)
    per_block = {"dense": 512, "nm": 16 * 8 * 2 + 16 * 2, "topk": 2 * k + k}  # values + positions
    col = 4  # int32 block-column per block
    ptrs = 3 * (out_f // 16 + 1) * 4  # one int32 CSR row pointer array per tier
    return (
        n_dense * (per_block["dense"] + col)
        + n_nm * (per_block["nm"] + col)
        + n_topk * (per_block["topk"] + col)
        + ptrs
    )


def test_bench_command_on_cpu(capsys):
    import torch

    assert main(["bench", "kernels", "--e2e", "tiny", "--new_tokens", "2"]) == 0
    out = capsys.readouterr().out
    for out_f, in_f in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        packed = _design_packed_bytes(out_f, in_f)
        dense = out_f * in_f * 2
        row = f"| {out_f}x{in_f} | {dense / 2**20:.1f} | {packed / 2**20:.1f} | {packed / dense:.3f} |"
        assert row in out, row
    if torch.cuda.is_available():
        assert "copy bandwidth" in out and "not measured" not in out
    else:
        assert "GPU timings: not measured" in out and "copy bandwidth" not in out
    assert "e2e generate (tiny" in out


def test_bench_command_names_the_benchmarks(capsys):
    assert main(["bench", "no_such_benchmark"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark 'no_such_benchmark'" in err and "kernels" in err and "_common" not in err


def test_every_recipe_field_is_a_flag_of_prune_and_progressive():
    """One definition: each HybridSparseConfig recipe field reaches the config through both commands."""
    import dataclasses

    from hf_hybrid_sparse import HybridSparseConfig
    from hf_hybrid_sparse.cli import progressive, prune
    from hf_hybrid_sparse.cli.arguments import recipe_from_args

    values = {
        "method": ("sparsegpt", "sparsegpt"),
        "pattern": ("unstructured", "unstructured"),  # progressive refuses it at run time, not in the parser
        "sparsity": ("0.3", 0.3),
        "comparison_group": ("layer", "layer"),
        "block_size": ("32", 32),
        "tier_ratios": ("0.5,0.3,0.2", (0.5, 0.3, 0.2)),
        "tier_group": ("row", "row"),
        "tier_rule": ("score", "score"),
        "layer_allocation": ("owl", "owl"),
        "owl_threshold": ("3", 3.0),
        "owl_lambda": ("0.1", 0.1),
        "nm": ("6:8", "2:8"),  # read with nm_convention=prune, stored in the kept form
        "nm_convention": ("prune", "keep"),
        "topk_per_block": ("7", 7),
        "indivisible": ("skip", "skip"),
        "nsamples": ("3", 3),
        "seqlen": ("64", 64),
        "seed": ("5", 5),
        "batch_size": ("2", 2),
        "targets": ("q_proj,k_proj", ["q_proj", "k_proj"]),
        "ignore": ("re:.*v_proj", ".*v_proj"),
        "dampening": ("0.05", 0.05),
        "sparsegpt_blocksize": ("64", 64),
        "reconstruction_epochs": ("3", 3),
        "reconstruction_lr": ("0.0003", 0.0003),
        "device": ("cpu", "cpu"),
        "offload_activations": ("true", True),
    }
    recipe = [f.name for f in dataclasses.fields(HybridSparseConfig) if f.metadata.get("recipe", True)]
    assert sorted(values) == sorted(recipe), "a recipe field was added: give it a value here"
    defaults = HybridSparseConfig()
    for name, (_, expected) in values.items():
        assert getattr(defaults, name) != expected, f"{name}: pick a non-default value"
    for module in (prune, progressive):
        parser = module.build_parser()
        helptext = parser.format_help()
        argv = ["--schedule", "s.csv", "--output", "o"] if module is progressive else []
        for name, (text, _) in values.items():
            assert f"--{name}" in helptext
            if module is progressive and name == "tier_ratios":
                continue  # the schedule gives the ratios
            argv += [f"--{name}", text]
        parsed = parser.parse_args_into_dataclasses(args=argv)
        config = recipe_from_args(parsed[1])
        for name, (_, expected) in values.items():
            if module is progressive and name == "tier_ratios":
                continue
            got = getattr(config, name)
            assert got == pytest.approx(expected) if isinstance(expected, float) else got == expected, name


def test_progressive_refuses_tier_ratios_and_other_patterns(capsys):
    assert main(["progressive", "--schedule", "s.csv", "--output", "o", "--tier_ratios", "0.5,0.5,0"]) == 2
    assert "from --schedule" in capsys.readouterr().err
    assert main(["progressive", "--schedule", "s.csv", "--output", "o", "--pattern", "2:4"]) == 2
    assert "is not 'hybrid'" in capsys.readouterr().err
