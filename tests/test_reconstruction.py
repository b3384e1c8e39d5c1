"""Block-wise reconstruction: each pruned block is fitted to the dense model's outputs, masks untouched."""

import copy

import pytest
import torch
from tiny_models import random_tokens, tiny_model

from hf_hybrid_sparse import (
    ConfigError,
    HybridSparseConfig,
    ModelStructureError,
    apply_hybrid_sparsity,
    sparsity_masks,
    tier_maps,
)
from hf_hybrid_sparse.pruning.patterns import check_hybrid
from hf_hybrid_sparse.state import iter_sparse_params


def _revived(model) -> int:
    params = dict(model.named_parameters())
    return sum(int((params[k][~m] != 0).sum()) for k, m in sparsity_masks(model).items())


def _logit_error(model, dense, probe) -> float:
    with torch.no_grad():
        return float((model(input_ids=probe).logits - dense(input_ids=probe).logits).pow(2).mean())


@pytest.mark.parametrize(
    ("family", "method"), [("llama", "sparsegpt"), ("gpt2", "wanda"), ("mixtral", "wanda")]
)
def test_reconstruction_brings_blocks_closer_to_dense_and_keeps_every_mask(family, method):
    dense = tiny_model(family)
    tokens = random_tokens(32, 32)
    cfg = dict(method=method, pattern="hybrid", nsamples=32, seqlen=32, batch_size=4)
    plain, fitted = copy.deepcopy(dense), copy.deepcopy(dense)
    apply_hybrid_sparsity(plain, HybridSparseConfig(**cfg), tokens)
    report = apply_hybrid_sparsity(
        fitted, HybridSparseConfig(**cfg, reconstruction_epochs=4, reconstruction_lr=1e-3), tokens
    )
    assert len(report.reconstruction) == 2
    for r in report.reconstruction:
        assert r["after"] < 0.9 * r["before"], r
    assert "reconstruction: mean block output error" in report.summary()
    assert _revived(fitted) == 0
    for _, _, _, state in iter_sparse_params(fitted):
        mask, tiers = state.logical_mask(), state.tier_map
        for e in range(mask.shape[0]) if mask.dim() == 3 else [None]:  # fused experts: one matrix each
            one = (mask, tiers) if e is None else (mask[e], tiers[e])
            assert check_hybrid(*one, 16, 2, 4, 15) == []
    # the first block sees the same inputs either way, so its tiers are the same; the weights moved
    first = [k for k in tier_maps(plain) if ".0." in k]
    assert first and all(torch.equal(tier_maps(plain)[k], tier_maps(fitted)[k]) for k in first)
    assert report.sparsity == pytest.approx(
        apply_hybrid_sparsity(copy.deepcopy(dense), HybridSparseConfig(**cfg), tokens).sparsity
    )
    # on held-out tokens too, the model's logits are closer to the dense model's
    probe = random_tokens(8, 32, seed=5)
    assert _logit_error(fitted, dense, probe) < 0.7 * _logit_error(plain, dense, probe)


def test_reconstruction_of_a_bf16_model_trains_in_fp32_and_stays_bf16():
    dense = tiny_model("llama").to(torch.bfloat16)
    tokens = random_tokens(4, 32)
    model = copy.deepcopy(dense)
    cfg = HybridSparseConfig(
        method="wanda", pattern="2:4", nsamples=4, seqlen=32, reconstruction_epochs=6, reconstruction_lr=1e-3
    )
    report = apply_hybrid_sparsity(model, cfg, tokens)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    assert _revived(model) == 0
    assert report.reconstruction[0]["after"] < report.reconstruction[0]["before"]


def test_reconstruction_restores_requires_grad_flags():
    model = tiny_model("llama")
    model.model.layers[0].input_layernorm.weight.requires_grad_(False)
    cfg = HybridSparseConfig(method="wanda", nsamples=4, seqlen=32, reconstruction_epochs=1)
    apply_hybrid_sparsity(model, cfg, random_tokens(4, 32))
    assert not model.model.layers[0].input_layernorm.weight.requires_grad
    assert model.model.layers[0].self_attn.q_proj.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_reconstruction_refuses_offloaded_blocks_before_any_change():
    from accelerate import cpu_offload

    model = tiny_model("opt")
    cpu_offload(model, execution_device=torch.device("cpu"))
    probe = random_tokens(1, 16, seed=3)
    with torch.no_grad():
        before = model(input_ids=probe).logits
    cfg = HybridSparseConfig(pattern="2:4", nsamples=4, seqlen=32, reconstruction_epochs=2)
    with pytest.raises(ModelStructureError, match="reconstruction_epochs=0"):
        apply_hybrid_sparsity(model, cfg, random_tokens(4, 32))
    with torch.no_grad():
        assert torch.equal(model(input_ids=probe).logits, before)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(reconstruction_epochs=-1), "must be >= 0"),
        (dict(reconstruction_epochs=2, reconstruction_lr=0.0), "positive"),
        (dict(reconstruction_epochs=2, method="magnitude"), "does not read"),
    ],
)
def test_bad_reconstruction_settings(fields, match):
    with pytest.raises(ConfigError, match=match):
        HybridSparseConfig(**fields).validate()


def test_reconstruction_lowers_the_real_models_perplexity(smollm2):
    from hf_hybrid_sparse import perplexity

    model, tok = smollm2
    # the first six blocks only, on 8 x 128 tokens: enough to see it, cheap enough for every run of the suite
    cfg = dict(
        method="wanda",
        pattern="hybrid",
        tier_group="row",
        nsamples=8,
        seqlen=128,
        batch_size=2,
        targets=r"model\.layers\.[0-5]\..*_proj",
    )
    results = {}
    for epochs in (0, 2):
        pruned = copy.deepcopy(model)
        apply_hybrid_sparsity(
            pruned, HybridSparseConfig(**cfg, reconstruction_epochs=epochs), "wiki_offline", tokenizer=tok
        )
        # held-out test-split windows: the reconstruction saw only train-split calibration text
        results[epochs] = perplexity(pruned, tok, "wiki_offline", seqlen=256, max_windows=8).perplexity
    assert results[2] < 0.97 * results[0], results
