"""Progressive pruning: schedules, monotone tiers, exact ratios, kill-and-resume, any architecture."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import random_tokens, tiny_model

from hf_hybrid_sparse import (
    DENSE,
    NM,
    TOPK,
    HybridSparseConfig,
    HybridSparseError,
    apply_hybrid_sparsity,
    tier_maps,
)
from hf_hybrid_sparse.errors import ScheduleError
from hf_hybrid_sparse.pruning.patterns import check_hybrid, tier_counts
from hf_hybrid_sparse.state import iter_sparse_params
from hf_hybrid_sparse.training.progressive import ProgressiveSettings, run_progressive
from hf_hybrid_sparse.training.schedule import load_schedule, parse_rows

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ROWS = [
    {"iteration": 1, "target_dense_ratio": 0.7, "target_2_4_ratio": 0.3, "target_topk_ratio": 0.0},
    {"iteration": 2, "target_dense_ratio": 0.5, "target_2_4_ratio": 0.4, "target_topk_ratio": 0.1},
    {"iteration": 3, "target_dense_ratio": 0.35, "target_2_4_ratio": 0.45, "target_topk_ratio": 0.2},
]


def test_example_schedule_and_formats(tmp_path):
    sched = load_schedule(EXAMPLES / "progressive.csv")
    assert [it.ratios for it in sched] == [(0.7, 0.3, 0.0), (0.5, 0.4, 0.1), (0.35, 0.45, 0.2)]
    (tmp_path / "s.yaml").write_text(
        "iterations:\n"
        + "".join(
            f"  - {{iteration: {r['iteration']}, dense: {r['target_dense_ratio']}, nm: {r['target_2_4_ratio']}, "
            f"topk: {r['target_topk_ratio']}, finetune_steps: 3}}\n"
            for r in ROWS
        )
    )
    ys = load_schedule(tmp_path / "s.yaml")
    assert [it.ratios for it in ys] == [it.ratios for it in sched] and ys[0].finetune_steps == 3
    # transitions only: 30% of DENSE to NM, then 0.2 of NM to TOPK
    tr = parse_rows(
        [
            {"iteration": 1, "dense_to_2_4_ratio": 0.3, "mid_2_4_to_topk_ratio": 0.0},
            {"iteration": 2, "dense_to_2_4_ratio": 0.5, "mid_2_4_to_topk_ratio": 0.2},
        ]
    )
    assert tr[0].ratios == pytest.approx((0.7, 0.3, 0.0))
    assert tr[1].ratios == pytest.approx((0.35, 0.52, 0.13))


@pytest.mark.parametrize(
    "rows, message",
    [
        ([ROWS[1], dict(ROWS[0], iteration=3)], "DENSE ratio rises"),
        (
            [
                ROWS[0],
                {
                    "iteration": 2,
                    "target_dense_ratio": 0.7,
                    "target_2_4_ratio": 0.3,
                    "target_topk_ratio": 0.0,
                },
                {
                    "iteration": 3,
                    "target_dense_ratio": 0.7,
                    "target_2_4_ratio": 0.1,
                    "target_topk_ratio": 0.2,
                },
                {
                    "iteration": 4,
                    "target_dense_ratio": 0.7,
                    "target_2_4_ratio": 0.2,
                    "target_topk_ratio": 0.1,
                },
            ],
            "TOPK ratio falls",
        ),
        (
            [{"iteration": 1, "target_dense_ratio": 0.7, "target_2_4_ratio": 0.3, "target_topk_ratio": 0.1}],
            "sum to 1.1",
        ),
        (
            [{"iteration": 1, "target_dense_ratio": 0.7, "target_2_4_ratio": 0.3}],
            r"missing column\(s\) \['target_topk_ratio'\]",
        ),
        (
            [{"target_dense_ratio": 1.0, "target_2_4_ratio": 0, "target_topk_ratio": 0}],
            "missing column 'iteration'",
        ),
        (
            [{"iteration": 1, "target_dense_ratio": "lots", "target_2_4_ratio": 0, "target_topk_ratio": 0}],
            "not a number",
        ),
        ([], "no rows"),
    ],
)
def test_bad_schedules(rows, message):
    with pytest.raises(ScheduleError, match=message):
        parse_rows(rows)


def test_unreadable_schedule_file(tmp_path):
    with pytest.raises(ScheduleError, match="does not exist"):
        load_schedule(tmp_path / "nope.csv")
    (tmp_path / "bad.yaml").write_text("iterations: [1, 2")
    with pytest.raises(ScheduleError, match="cannot parse"):
        load_schedule(tmp_path / "bad.yaml")


@st.composite
def schedules(draw):
    n = draw(st.integers(1, 4))
    rows, d, nm, t = [], 1.0, 0.0, 0.0
    for i in range(n):
        a = draw(st.floats(0, 1))
        b = draw(st.floats(0, 1))
        moved = d * a
        d, nm = d - moved, nm + moved
        to_t = nm * b
        nm, t = nm - to_t, t + to_t
        rows.append(
            {
                "iteration": i + 1,
                "target_dense_ratio": d,
                "target_2_4_ratio": nm,
                "target_topk_ratio": 1 - d - nm,
            }
        )
    return rows


@settings(max_examples=12, deadline=None)
@given(rows=schedules(), group=st.sampled_from(["layer", "row"]), seed=st.integers(0, 100))
def test_property_tiers_never_move_back_and_ratios_are_exact(rows, group, seed):
    sched = parse_rows(rows)
    model = tiny_model("llama", seed=seed)
    previous = None
    for it in sched:
        cfg = HybridSparseConfig(method="magnitude", tier_ratios=it.ratios, tier_group=group)
        apply_hybrid_sparsity(model, cfg)
        maps = {k: v.clone() for k, v in tier_maps(model).items()}
        for _, module, pname, state in iter_sparse_params(model):
            tm = state.tier_map
            groups = tm.reshape(1, -1) if group == "layer" else tm
            for g in groups:
                assert tuple(int((g == c).sum()) for c in (DENSE, NM, TOPK)) == tier_counts(
                    g.numel(), it.ratios
                )
            assert check_hybrid(state.logical_mask(), tm, 16, 2, 4, 15) == []
            w = getattr(module, pname)
            assert (w[~state.mask] == 0).all()
        if previous is not None:
            for k, v in maps.items():
                assert (v.long() >= previous[k].long()).all(), k
        previous = maps
        with torch.no_grad():  # "fine-tuning" between iterations changes the kept weights
            for _, module, pname, state in iter_sparse_params(model):
                w = getattr(module, pname)
                w.add_(torch.randn_like(w) * 0.05 * state.mask)


def _settings():
    return ProgressiveSettings(
        config=HybridSparseConfig(nsamples=4, seqlen=32),
        calib=random_tokens(64, 32),
        finetune_steps=2,
        train_seqlen=32,
        eval_windows=None,
    )


def _final_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {
        k: v.clone() for k, v in tier_maps(model).items()
    }


def _load_last(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder / "iteration-003")


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox"])
def test_kill_and_resume_ends_like_an_uninterrupted_run(tmp_path, family, monkeypatch):
    sched = parse_rows(ROWS)
    run_progressive(tiny_model(family), None, sched, _settings(), tmp_path / "full", model_id=family)
    ref_weights, ref_maps = _final_state(_load_last(tmp_path / "full"))
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert [s["iteration"] for s in summary] == [1, 2, 3] and summary[-1]["sparsity"] > 0.39

    # (a) stopped after an iteration
    run_progressive(
        tiny_model(family), None, sched, _settings(), tmp_path / "a", model_id=family, stop_after=1
    )
    assert not (tmp_path / "a" / "iteration-002").exists()
    run_progressive(tiny_model(family), None, sched, _settings(), tmp_path / "a", model_id=family)
    # (b) killed in the middle of iteration 2 (during fine-tuning)
    import hf_hybrid_sparse.training.progressive as prog

    real = prog._finetune

    def dying(model, tokenizer, settings, it, workdir, *rest):
        if it.iteration == 2:
            raise KeyboardInterrupt("killed")
        return real(model, tokenizer, settings, it, workdir, *rest)

    monkeypatch.setattr(prog, "_finetune", dying)
    with pytest.raises(KeyboardInterrupt):
        run_progressive(tiny_model(family), None, sched, _settings(), tmp_path / "b", model_id=family)
    assert (tmp_path / "b" / "iteration-001" / "progress.json").exists()
    assert not (tmp_path / "b" / "iteration-002").exists()
    monkeypatch.setattr(prog, "_finetune", real)
    run_progressive(tiny_model(family), None, sched, _settings(), tmp_path / "b", model_id=family)

    for folder in ("a", "b"):
        weights, maps = _final_state(_load_last(tmp_path / folder))
        assert maps.keys() == ref_maps.keys()
        assert all(torch.equal(maps[k], ref_maps[k]) for k in maps)
        assert all(torch.equal(weights[k], ref_weights[k]) for k in weights), folder


def test_resume_folder_from_another_run_is_refused(tmp_path):
    sched = parse_rows(ROWS)
    run_progressive(
        tiny_model("llama"), None, sched, _settings(), tmp_path / "r", model_id="llama", stop_after=1
    )
    with pytest.raises(HybridSparseError, match="another schedule"):
        run_progressive(
            tiny_model("llama"), None, parse_rows(ROWS[:2]), _settings(), tmp_path / "r", model_id="llama"
        )
    with pytest.raises(HybridSparseError, match="another model"):
        run_progressive(tiny_model("opt"), None, sched, _settings(), tmp_path / "r", model_id="opt")
    with pytest.raises(HybridSparseError, match="pass resume=True"):
        run_progressive(
            tiny_model("llama"), None, sched, _settings(), tmp_path / "r", model_id="llama", resume=False
        )


@pytest.mark.parametrize(
    "change, field",
    [
        (
            lambda s: setattr(s, "config", HybridSparseConfig(nsamples=4, seqlen=32, method="magnitude")),
            "recipe.method",
        ),
        (lambda s: setattr(s, "config", HybridSparseConfig(nsamples=8, seqlen=32)), "recipe.nsamples"),
        (lambda s: setattr(s, "finetune_steps", 5), "finetune_steps"),
        (lambda s: setattr(s, "learning_rate", 1e-3), "learning_rate"),
        (lambda s: setattr(s, "seed", 3), "seed"),
        (lambda s: setattr(s, "calib", random_tokens(64, 32, seed=9)), "calib"),
    ],
)
def test_resume_with_changed_settings_is_refused_naming_the_field(tmp_path, change, field):
    sched = parse_rows(ROWS)
    run_progressive(
        tiny_model("llama"), None, sched, _settings(), tmp_path / "r", model_id="llama", stop_after=1
    )
    changed = _settings()
    change(changed)
    with pytest.raises(HybridSparseError, match=rf"other settings than the run was started with \({field}: "):
        run_progressive(tiny_model("llama"), None, sched, changed, tmp_path / "r", model_id="llama")
    # where it runs is not pinned: another device / activation offloading resumes fine
    moved = _settings()
    moved.config = HybridSparseConfig(nsamples=4, seqlen=32, offload_activations=True, device="cpu")
    summary = run_progressive(tiny_model("llama"), None, sched, moved, tmp_path / "r", model_id="llama")
    assert [s["iteration"] for s in summary] == [1, 2, 3]


def test_iteration_folders_without_run_json_are_refused(tmp_path):
    sched = parse_rows(ROWS)
    run_progressive(
        tiny_model("llama"), None, sched, _settings(), tmp_path / "r", model_id="llama", stop_after=1
    )
    (tmp_path / "r" / "run.json").unlink()
    with pytest.raises(HybridSparseError, match="iteration folders but no run.json"):
        run_progressive(
            tiny_model("llama"), None, parse_rows(ROWS[:2]), _settings(), tmp_path / "r", model_id="llama"
        )


def test_schedule_numbering_is_kept_and_done_iterations_are_not_recomputed(tmp_path, monkeypatch):
    import hf_hybrid_sparse.training.progressive as prog

    sched = parse_rows([dict(r, iteration=10 * r["iteration"]) for r in ROWS])
    run_progressive(
        tiny_model("llama"), None, sched, _settings(), tmp_path / "r", model_id="llama", stop_after=2
    )
    assert sorted(p.name for p in (tmp_path / "r").glob("iteration-*")) == ["iteration-010", "iteration-020"]
    pruned = []
    real = prog.apply_hybrid_sparsity
    monkeypatch.setattr(
        prog,
        "apply_hybrid_sparsity",
        lambda m, c, *a, **k: pruned.append(c.tier_ratios) or real(m, c, *a, **k),
    )
    summary = run_progressive(tiny_model("llama"), None, sched, _settings(), tmp_path / "r", model_id="llama")
    assert pruned == [(0.35, 0.45, 0.2)]  # only iteration 30 ran
    assert [s["iteration"] for s in summary] == [10, 20, 30]


def test_progressive_command(tmp_path, capsys, tiny_checkpoint):
    from hf_hybrid_sparse.cli import main

    args = [
        "progressive",
        "--model",
        str(tiny_checkpoint),
        "--schedule",
        str(EXAMPLES / "progressive.csv"),
        "--output",
        str(tmp_path / "run"),
        "--nsamples",
        "4",
        "--seqlen",
        "64",
        "--finetune_steps",
        "1",
        "--finetune_seqlen",
        "64",
        "--eval_seqlen",
        "64",
        "--eval_windows",
        "2",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| 3 | 0.350/0.450/0.200 |" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["iteration"] for s in summary] == [1, 2, 3]
    dense = json.loads((tmp_path / "run" / "dense.json").read_text())["perplexity"]
    assert f"| dense | 1/0/0 | 1/0/0 | 0.00% | {dense:.3f} |" in (tmp_path / "run" / "summary.md").read_text()
    assert main(args) == 2  # the folder exists: --resume needed
    assert main(args + ["--resume"]) == 0  # nothing left to do


def test_progress_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need the [viz] extra")
    from hf_hybrid_sparse.viz import plot_progress

    summary = [
        {"iteration": i, "sparsity": s, "perplexity": p}
        for i, s, p in [(1, 0.15, 18.0), (2, 0.29, 30.0), (3, 0.41, 60.0)]
    ]
    png = plot_progress(summary, tmp_path / "p.png", dense={"perplexity": 15.0})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
