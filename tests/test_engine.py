"""Engine semantics: Wanda equals its formula, batching does not change statistics, offload works."""

import copy
import math

import pytest
import torch
from tiny_models import random_tokens, tiny_model

from hf_hybrid_sparse import (
    CalibrationError,
    HybridSparseConfig,
    ModelStructureError,
    PruningError,
    TierMapError,
    apply_hybrid_sparsity,
    get_state,
    sparsity_masks,
    tier_maps,
)
from hf_hybrid_sparse.engine.discovery import find_decoder_blocks, find_targets
from hf_hybrid_sparse.engine.statistics import collecting
from hf_hybrid_sparse.pruning.patterns import unstructured_mask
from hf_hybrid_sparse.pruning.scoring import InputStats, wanda_scores


def test_wanda_hand_checked_example():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [-0.5, 0.5, 0.5, 4.0]])
    x = torch.tensor([[1.0, 0.0, 2.0, 1.0], [1.0, 1.0, 0.0, 1.0]])  # two tokens
    stats = InputStats(4, torch.device("cpu"))
    stats.add(x)
    norms = torch.tensor([math.sqrt(2), 1.0, 2.0, math.sqrt(2)])
    assert torch.allclose(stats.column_norms(), norms)
    scores = wanda_scores(w, stats)
    assert torch.allclose(scores[0], torch.tensor([math.sqrt(2), 2.0, 6.0, 4 * math.sqrt(2)]))
    mask = unstructured_mask(scores, 0.5, "row")
    assert mask.tolist() == [[False, False, True, True], [False, False, True, True]]
    # layer-wise comparison keeps the 4 largest overall: 6, 5.66, 5.66 (row 1 col 3), 2
    mask = unstructured_mask(scores, 0.5, "layer")
    assert mask.tolist() == [[False, True, True, True], [False, False, False, True]]


def _first_layer_inputs(model, tokens, module):
    seen = []
    handle = module.register_forward_hook(
        lambda m, i, o: seen.append(i[0].detach().reshape(-1, i[0].shape[-1]))
    )
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_engine_wanda_matches_formula_on_first_block(family):
    model = tiny_model(family)
    tokens = random_tokens(4, 32)
    dense = copy.deepcopy(model)
    _, blocks = find_decoder_blocks(dense)
    target = find_targets(blocks[0], "b0", None, ["lm_head"])[0]
    x = _first_layer_inputs(dense, tokens, target.module)
    w = target.param.detach()
    w = w.t() if target.transposed else w
    expected = unstructured_mask(w.abs() * x.pow(2).sum(0).sqrt(), 0.5, "row")
    apply_hybrid_sparsity(model, HybridSparseConfig(pattern="unstructured", nsamples=4, seqlen=32), tokens)
    _, pruned_blocks = find_decoder_blocks(model)
    pruned_target = find_targets(pruned_blocks[0], "b0", None, ["lm_head"])[0]
    state = get_state(pruned_target.module)["weight"]
    assert torch.equal(state.logical_mask(), expected)


def test_batched_and_one_at_a_time_statistics_agree():
    model = tiny_model("llama")
    tokens = random_tokens(8, 32)
    _, blocks = find_decoder_blocks(model)
    targets = find_targets(blocks[0], "b0", None, None)
    emb = model.model.embed_tokens(tokens)
    pos = model.model.rotary_emb(emb, torch.arange(32).unsqueeze(0))

    def run(batch):
        with collecting(targets, hessian=True) as stats, torch.no_grad():
            for chunk in torch.split(emb, batch):
                blocks[0](chunk, position_embeddings=pos, attention_mask=None)
        return stats

    one, eight = run(1), run(8)
    for t in targets:
        assert one[t.name].tokens == eight[t.name].tokens == 8 * 32
        assert torch.allclose(one[t.name].sq_norm, eight[t.name].sq_norm, rtol=1e-5)
        assert torch.allclose(one[t.name].hessian(), eight[t.name].hessian(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pattern", ["unstructured", "hybrid"])
def test_batch_size_does_not_change_masks(pattern):
    tokens = random_tokens(8, 32)
    masks = []
    for bs in (1, 3, 8):
        model = tiny_model("qwen2")
        apply_hybrid_sparsity(
            model, HybridSparseConfig(pattern=pattern, nsamples=8, seqlen=32, batch_size=bs), tokens
        )
        masks.append(sparsity_masks(model))
    for other in masks[1:]:
        assert masks[0].keys() == other.keys()
        for k in masks[0]:
            assert torch.equal(masks[0][k], other[k]), k


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_disk_offloaded_model_gets_the_same_masks(tmp_path, method):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "ckpt")
    tokens = random_tokens(6, 32)
    cfg = HybridSparseConfig(method=method, pattern="hybrid", nsamples=6, seqlen=32, batch_size=2)
    apply_hybrid_sparsity(model, cfg, tokens)

    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "disk",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    assert offloaded.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    apply_hybrid_sparsity(offloaded, cfg, tokens)
    a, b = sparsity_masks(model), sparsity_masks(offloaded)
    assert a.keys() == b.keys() and len(a) == 14
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k
    for k, v in tier_maps(model).items():
        assert torch.equal(v, tier_maps(offloaded)[k])
    # the pruned weights were written back into the offload store: outputs agree
    probe = random_tokens(1, 16, seed=3)
    with torch.no_grad():
        ref = model(input_ids=probe).logits
        got = offloaded(input_ids=probe).logits
    assert torch.allclose(ref, got, atol=1e-5)


def test_cpu_offload_writes_back():
    from accelerate import cpu_offload

    model = tiny_model("opt")
    ref = copy.deepcopy(model)
    tokens = random_tokens(4, 32)
    cfg = HybridSparseConfig(pattern="2:4", nsamples=4, seqlen=32)
    apply_hybrid_sparsity(ref, cfg, tokens)
    cpu_offload(model, execution_device=torch.device("cpu"))
    apply_hybrid_sparsity(model, cfg, tokens)
    probe = random_tokens(1, 16, seed=3)
    with torch.no_grad():
        assert torch.allclose(ref(input_ids=probe).logits, model(input_ids=probe).logits, atol=1e-5)


def test_previous_tier_maps_are_respected_by_the_engine():
    tokens = random_tokens(6, 32)
    model = tiny_model("llama")
    apply_hybrid_sparsity(
        model, HybridSparseConfig(tier_ratios=(0.5, 0.3, 0.2), nsamples=6, seqlen=32), tokens
    )
    first = {k: v.clone() for k, v in tier_maps(model).items()}
    first_masks = {k: v.clone() for k, v in sparsity_masks(model).items()}
    # the tier maps already on the modules are the previous ones
    apply_hybrid_sparsity(
        model, HybridSparseConfig(tier_ratios=(0.3, 0.4, 0.3), nsamples=6, seqlen=32), tokens
    )
    for k, v in tier_maps(model).items():
        assert (v.long() >= first[k].long()).all(), k
    for k, m in sparsity_masks(model).items():
        assert not (m & ~first_masks[k]).any(), f"{k}: a pruned weight came back"
    # explicit previous maps on a fresh model
    fresh = tiny_model("llama")
    report = apply_hybrid_sparsity(
        fresh,
        HybridSparseConfig(tier_ratios=(0.3, 0.4, 0.3), nsamples=6, seqlen=32),
        tokens,
        previous_tier_maps=first,
    )
    assert report.sparsity > 0.4
    for k, v in tier_maps(fresh).items():
        assert (v.long() >= first[k].long()).all()


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_previous_tier_maps_fail_before_any_weight_changes():
    tokens = random_tokens(4, 32)
    model = tiny_model("llama")
    apply_hybrid_sparsity(
        model, HybridSparseConfig(tier_ratios=(0.2, 0.4, 0.4), nsamples=4, seqlen=32), tokens
    )
    maps = {k: v.clone() for k, v in tier_maps(model).items()}
    fresh = tiny_model("llama")
    before = _weights(fresh)
    with pytest.raises(TierMapError, match="denser tier"):
        apply_hybrid_sparsity(
            fresh,
            HybridSparseConfig(tier_ratios=(0.5, 0.3, 0.2), nsamples=4, seqlen=32),
            tokens,
            previous_tier_maps=maps,
        )
    wrong = dict(maps)
    key = next(iter(wrong))
    wrong[key] = wrong[key][:, :1]
    with pytest.raises(TierMapError, match=r"shape"):
        apply_hybrid_sparsity(
            fresh, HybridSparseConfig(nsamples=4, seqlen=32), tokens, previous_tier_maps=wrong
        )
    assert _unchanged(fresh, before)


def test_shapes_that_do_not_tile_fail_before_any_weight_changes():
    model = tiny_model("llama")
    before = _weights(model)
    with pytest.raises(
        ModelStructureError, match=r"model\.layers\.0\.self_attn\.q_proj.*not divisible into 48x48"
    ):
        apply_hybrid_sparsity(
            model, HybridSparseConfig(block_size=48, nsamples=4, seqlen=32), random_tokens(4, 32)
        )
    with pytest.raises(ModelStructureError, match=r"not divisible by M=6"):
        apply_hybrid_sparsity(model, HybridSparseConfig(pattern="3:6"), random_tokens(4, 32))
    assert _unchanged(model, before)
    report = apply_hybrid_sparsity(
        model, HybridSparseConfig(block_size=32, indivisible="skip", method="magnitude"), random_tokens(4, 32)
    )
    assert not any(m.skipped for m in report.modules)  # 64 and 128 divide by 32


def test_indivisible_skip_leaves_layers_dense_and_reports_them():
    model = tiny_model("llama")  # k/v projections are 32 x 64, others 64/128 wide
    report = apply_hybrid_sparsity(
        model, HybridSparseConfig(block_size=64, indivisible="skip", method="magnitude")
    )
    skipped = [m.name for m in report.modules if m.skipped]
    assert skipped and all("k_proj" in n or "v_proj" in n for n in skipped)
    assert "k_proj" in report.to_markdown() and "not divisible" in report.to_markdown()


def test_non_causal_and_encoder_decoder_models_are_rejected():
    from transformers import AutoModel, LlamaConfig, T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(
        T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64, d_kv=16)
    )
    with pytest.raises(ModelStructureError, match="encoder-decoder"):
        apply_hybrid_sparsity(t5, HybridSparseConfig(method="magnitude"))
    base = AutoModel.from_config(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ModelStructureError, match="not a causal language model"):
        apply_hybrid_sparsity(base, HybridSparseConfig(method="magnitude"))


def test_no_prunable_layers():
    model = tiny_model("llama")
    with pytest.raises(ModelStructureError, match="No prunable linear layers"):
        apply_hybrid_sparsity(model, HybridSparseConfig(targets=["does_not_exist"], method="magnitude"))
    with pytest.raises(ModelStructureError, match="outside the decoder blocks"):
        apply_hybrid_sparsity(
            model, HybridSparseConfig(targets=["lm_head", "q_proj"], ignore=[], method="magnitude")
        )


def test_bad_calibration_data():
    model = tiny_model("llama")
    before = _weights(model)
    with pytest.raises(CalibrationError, match="empty"):
        apply_hybrid_sparsity(model, HybridSparseConfig(nsamples=2, seqlen=32), [])
    with pytest.raises(CalibrationError, match="shorter than seqlen=32"):
        apply_hybrid_sparsity(
            model, HybridSparseConfig(nsamples=2, seqlen=32), [torch.arange(10), torch.arange(40)]
        )
    with pytest.raises(CalibrationError, match="Only 1 token samples"):
        apply_hybrid_sparsity(model, HybridSparseConfig(nsamples=2, seqlen=32), random_tokens(1, 32))
    with pytest.raises(CalibrationError, match="max_position_embeddings=256"):
        apply_hybrid_sparsity(model, HybridSparseConfig(nsamples=2, seqlen=512), random_tokens(2, 512))
    with pytest.raises(CalibrationError, match="Unknown calibration dataset 'nope'.*wiki_offline"):
        apply_hybrid_sparsity(model, HybridSparseConfig(nsamples=2, seqlen=32), "nope")
    assert _unchanged(model, before)


def test_failure_mid_run_names_block_and_module(monkeypatch):
    import hf_hybrid_sparse.engine.sequential as engine

    real = engine.prune_matrix
    calls = {"n": 0}

    def flaky(weight, config, *a, **k):
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("simulated numerical failure")
        return real(weight, config, *a, **k)

    monkeypatch.setattr(engine, "prune_matrix", flaky)
    with pytest.raises(
        PruningError, match=r"block 1 \(`model\.layers\.1`\), module `model\.layers\.1\.self_attn\.k_proj`"
    ):
        apply_hybrid_sparsity(
            tiny_model("llama"), HybridSparseConfig(nsamples=2, seqlen=32), random_tokens(2, 32)
        )


def test_report_renders_markdown_and_dict():
    model = tiny_model("llama")
    report = apply_hybrid_sparsity(model, HybridSparseConfig(nsamples=2, seqlen=32), random_tokens(2, 32))
    md = report.to_markdown()
    assert md.startswith("| module |") and "model.layers.1.mlp.down_proj" in md and "**total**" in md
    d = report.to_dict()
    assert d["tier_totals"] == report.tier_totals() and abs(d["sparsity"] - report.sparsity) < 1e-12
    assert report.calibration_tokens == 64 and report.seconds > 0
    assert sum(report.tier_totals().values()) == sum(m.numel for m in report.modules) // 256


def test_offloaded_activations_give_the_same_masks():
    tokens = random_tokens(4, 32)
    a, b = tiny_model("llama"), tiny_model("llama")
    apply_hybrid_sparsity(a, HybridSparseConfig(nsamples=4, seqlen=32, batch_size=2), tokens)
    apply_hybrid_sparsity(
        b, HybridSparseConfig(nsamples=4, seqlen=32, batch_size=2, offload_activations=True), tokens
    )
    ma, mb = sparsity_masks(a), sparsity_masks(b)
    assert ma.keys() == mb.keys() and ma
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_report_plots_the_tier_maps(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need the [viz] extra")
    model = tiny_model("llama")
    report = apply_hybrid_sparsity(model, HybridSparseConfig(method="magnitude"))
    (png,) = report.plot_tier_maps(model, str(tmp_path / "tiers.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    from hf_hybrid_sparse.viz import plot_tier_maps

    maps = tier_maps(model)
    pages = plot_tier_maps(maps, tmp_path / "t.png", modules_per_page=4)
    n = -(-len(maps) // 4)
    assert len(maps) > 4 and [p.name for p in pages] == [f"t-{i}of{n}.png" for i in range(1, n + 1)]
    assert all(p.stat().st_size > 2000 for p in pages)  # every module is drawn, on some page


def test_layers_fed_the_same_input_share_one_accumulation():
    model = tiny_model("llama")
    _, blocks = find_decoder_blocks(model)
    targets = find_targets(blocks[0], "b0", None, None)
    emb = model.model.embed_tokens(random_tokens(4, 16))
    pos = model.model.rotary_emb(emb, torch.arange(16).unsqueeze(0))
    with collecting(targets, hessian=True) as stats, torch.no_grad():
        for chunk in torch.split(emb, 2):
            blocks[0](chunk, position_embeddings=pos, attention_mask=None)
    by_name = {t.name.rsplit(".", 1)[-1]: stats[t.name] for t in targets}
    assert by_name["q_proj"] is by_name["k_proj"] is by_name["v_proj"]
    assert by_name["gate_proj"] is by_name["up_proj"]
    assert len({id(s) for s in by_name.values()}) == 4  # qkv, o, gate/up, down
    # the shared statistics are those of the layer's own input
    x = _first_layer_inputs_block(blocks[0], emb, pos, targets[0].module)
    assert by_name["q_proj"].tokens == x.shape[0] == 4 * 16
    assert torch.allclose(by_name["q_proj"].sq_norm, x.pow(2).sum(0), rtol=1e-5)
    assert torch.allclose(by_name["q_proj"].gram(), x.t() @ x, rtol=1e-4, atol=1e-4)


def _first_layer_inputs_block(block, emb, pos, module):
    seen = []
    handle = module.register_forward_hook(
        lambda m, i, o: seen.append(i[0].detach().reshape(-1, i[0].shape[-1]))
    )
    with torch.no_grad():
        block(emb, position_embeddings=pos, attention_mask=None)
    handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("width", [64, 300, 1100])
def test_the_gram_matrix_is_the_full_product(width):
    """Only the upper block triangle is accumulated; gram() and hessian() must equal X^T X for any width."""
    g = torch.Generator().manual_seed(width)
    batches = [torch.randn(n, width, generator=g) * torch.linspace(0.1, 3, width) for n in (37, 64, 5)]
    stats = InputStats(width, torch.device("cpu"), hessian=True)
    for x in batches:
        stats.add(x)
    x = torch.cat(batches).double()
    assert torch.allclose(stats.gram().double(), x.t() @ x, rtol=1e-5, atol=1e-3)
    assert torch.equal(stats.gram(), stats.gram().t())
    assert torch.allclose(stats.hessian().double(), 2 * x.t() @ x / x.shape[0], rtol=1e-5, atol=1e-4)


def _prune_with_early_stop(monkeypatch, family: str, method: str, enabled: bool):
    from hf_hybrid_sparse.engine import statistics

    if not enabled:  # the reference: every statistics forward runs to the end
        monkeypatch.setattr(statistics._EarlyStop, "seen", lambda self, name: None)
    model = tiny_model(family)
    apply_hybrid_sparsity(
        model,
        HybridSparseConfig(method=method, pattern="hybrid", nsamples=8, seqlen=32, batch_size=2),
        random_tokens(8, 32),
    )
    monkeypatch.undo()
    return model


@pytest.mark.parametrize(
    "family,method", [("llama", "sparsegpt"), ("gpt2", "wanda"), ("falcon", "sparsegpt")]
)
def test_statistics_forwards_that_stop_early_give_the_same_model(monkeypatch, family, method):
    """The statistics pass's outputs are discarded, so ending its forwards once every input is recorded
    changes no mask and no weight (bit for bit)."""
    early = _prune_with_early_stop(monkeypatch, family, method, True)
    full = _prune_with_early_stop(monkeypatch, family, method, False)
    assert sparsity_masks(early).keys() == sparsity_masks(full).keys()
    for k, m in sparsity_masks(early).items():
        assert torch.equal(m, sparsity_masks(full)[k]), k
    for (name, a), b in zip(early.state_dict().items(), full.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_last_layer_of_a_block_is_skipped_in_the_statistics_pass():
    """Llama: after a first full forward (which arms the stop), the statistics forwards end at down_proj's
    input: of the 4 statistics forwards of every block, 3 skip down_proj (other forwards run both)."""
    model = tiny_model("llama")
    calls = {}
    for i, layer in enumerate(model.model.layers):
        for name in ("down_proj", "up_proj"):
            getattr(layer.mlp, name).register_forward_hook(
                lambda *_, k=(i, name): calls.__setitem__(k, calls.get(k, 0) + 1)
            )
    apply_hybrid_sparsity(
        model, HybridSparseConfig(method="wanda", nsamples=8, seqlen=16, batch_size=2), random_tokens(8, 16)
    )
    for i in range(len(model.model.layers)):
        assert calls[(i, "up_proj")] - calls[(i, "down_proj")] == 3
    assert calls[(1, "down_proj")] == 1  # the last block: no recompute, one full statistics forward


def test_a_layer_called_twice_per_forward_never_stops_early():
    """A target called twice in one forward keeps both inputs: the stop is never armed. (The engine then
    refuses the block, since its layers saw different token counts; that check is unchanged.)"""
    from hf_hybrid_sparse.engine.statistics import StatisticsComplete

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.a(self.b(self.a(x)))

    block = Twice()
    targets = find_targets(block, "t", None, None)
    assert len(targets) == 2
    with (
        pytest.raises(RuntimeError, match="different token counts"),
        collecting(targets, hessian=False, stop_in=block) as stats,
        torch.no_grad(),
    ):
        for _ in range(3):
            try:
                block(torch.randn(4, 8))
            except StatisticsComplete:  # pragma: no cover - the failure this test guards against
                pytest.fail("a forward stopped although a layer is called twice")
        a = next(s for name, s in stats.items() if name.endswith(".a.weight") or name.endswith(".a"))
        assert a.tokens == 3 * 2 * 4
