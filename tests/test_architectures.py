"""Every family of DESIGN.md prunes through the same code path, with exact patterns."""

import math

import pytest
import torch
from tiny_models import FAMILIES, random_tokens, tiny_model

from hf_hybrid_sparse import DENSE, NM, TOPK, HybridSparseConfig, apply_hybrid_sparsity, iter_sparse_params
from hf_hybrid_sparse.pruning.patterns import check_hybrid, tier_counts

PATTERNS = {
    "unstructured": dict(pattern="unstructured", sparsity=0.5),
    "unstructured-layer": dict(pattern="unstructured", sparsity=0.3, comparison_group="layer"),
    "2:4": dict(pattern="2:4"),
    "4:8": dict(pattern="4:8"),
    "hybrid-layer": dict(pattern="hybrid", tier_group="layer"),
    "hybrid-row": dict(pattern="hybrid", tier_group="row"),
}


def _logical_matrices(module, pname, state):
    param = getattr(module, pname).detach()
    mask = state.logical_mask()
    w = param.transpose(-1, -2) if state.transposed else param
    if w.dim() == 2:
        return [(w, mask, state.tier_map)]
    return [(w[e], mask[e], None if state.tier_map is None else state.tier_map[e]) for e in range(w.shape[0])]


def check_model(model, cfg):
    n_checked = 0
    for name, module, pname, state in iter_sparse_params(model):
        for w, mask, tiers in _logical_matrices(module, pname, state):
            rows, cols = w.shape
            assert (w[~mask] == 0).all(), f"{name}: pruned weights are not zero"
            if cfg.pattern == "unstructured":
                if cfg.comparison_group == "row":
                    assert ((~mask).sum(1) == math.floor(cfg.sparsity * cols)).all(), name
                else:
                    assert int((~mask).sum()) == math.floor(cfg.sparsity * rows * cols), name
            elif cfg.pattern == "hybrid":
                assert check_hybrid(mask, tiers, 16, 2, 4, 15) == [], name
                groups = tiers.reshape(1, -1) if cfg.tier_group == "layer" else tiers
                for g in groups:
                    got = tuple(int((g == c).sum()) for c in (DENSE, NM, TOPK))
                    assert got == tier_counts(g.numel(), cfg.tier_ratios), name
            else:
                n, m = cfg.pattern_nm
                assert (mask.reshape(rows, cols // m, m).sum(-1) == n).all(), name
            n_checked += 1
    return n_checked


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_wanda_every_family_every_pattern(family, pattern):
    model = tiny_model(family)
    cfg = HybridSparseConfig(method="wanda", nsamples=6, seqlen=32, batch_size=4, **PATTERNS[pattern])
    report = apply_hybrid_sparsity(model, cfg, random_tokens(6, 32))
    assert check_model(model, cfg) > 0
    assert 0 < report.sparsity < 1
    out = model(input_ids=random_tokens(1, 16, seed=5)).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_other_methods_every_family(family, method):
    model = tiny_model(family)
    cfg = HybridSparseConfig(method=method, pattern="hybrid", nsamples=6, seqlen=32, batch_size=3)
    apply_hybrid_sparsity(model, cfg, random_tokens(6, 32))
    assert check_model(model, cfg) > 0
    cfg = HybridSparseConfig(method=method, pattern="2:4", nsamples=6, seqlen=32, batch_size=3)
    model = tiny_model(family)
    apply_hybrid_sparsity(model, cfg, random_tokens(6, 32))
    assert check_model(model, cfg) > 0


def test_every_linear_in_every_block_is_found():
    """No layer is silently left out: the targets are exactly the linear weights of the blocks."""
    from transformers.pytorch_utils import Conv1D

    for family in FAMILIES:
        model = tiny_model(family)
        apply_hybrid_sparsity(model, HybridSparseConfig(method="magnitude"))
        pruned = {n if p == "weight" else f"{n}.{p}" for n, _, p, _ in iter_sparse_params(model)}
        expected = set()
        for name, module in model.named_modules():
            if (
                isinstance(module, (torch.nn.Linear, Conv1D))
                and name != "lm_head"
                and "embed_out" not in name
            ):
                expected.add(name)
            if type(module).__name__.endswith("Experts"):
                expected |= {f"{name}.{p}" for p, t in module.named_parameters(recurse=False) if t.dim() == 3}
        assert pruned == expected, family


def test_mixtral_experts_are_calibrated_on_their_routed_tokens():
    """Per-expert Wanda statistics equal the norms of exactly the tokens the router sent to that expert."""
    from hf_hybrid_sparse.engine.discovery import find_targets
    from hf_hybrid_sparse.engine.statistics import collecting, eager_experts

    model = tiny_model("mixtral")
    moe = model.model.layers[0].mlp
    x = torch.randn(1, 24, 64)
    targets = [t for t in find_targets(model.model.layers[0], "l0", None, None) if t.kind == "experts"]
    with eager_experts(targets), collecting(targets, hessian=False) as stats:
        moe(x)
    _, _, top_idx = moe.gate(x.reshape(-1, 64))
    gate_up = stats["l0.mlp.experts.gate_up_proj"]
    for e in range(4):
        routed = (top_idx == e).any(dim=1)
        expected = x.reshape(-1, 64)[routed].pow(2).sum(0)
        if routed.any():
            assert torch.allclose(gate_up[e].sq_norm, expected, rtol=1e-5, atol=1e-6)
            assert gate_up[e].tokens == int(routed.sum())
        else:
            assert gate_up[e] is None
