"""The loss-aware tier rule (exact minimum removed score mass) and explicit per-layer tier counts."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_hybrid_sparse import DENSE, NM, TOPK, TierMapError
from hf_hybrid_sparse.pruning.patterns import (
    assign_tiers,
    assign_tiers_min_loss,
    block_scores,
    group_counts,
    hybrid_tiers,
    tier_costs,
)


def _two_blocks() -> torch.Tensor:
    """Two 4x4 blocks side by side: left spreads 16.0 over all weights, right holds 16.5 in two."""
    s = torch.zeros(4, 8)
    s[:, :4] = 1.0
    s[0, 4] = s[2, 6] = 8.25
    return s


def test_tier_costs_by_hand():
    costs = tier_costs(_two_blocks(), bs=4, n=2, m=4, k=2)
    # left: NM keeps 2 of 4 per row (8 of 16 ones removed), TOPK keeps 2 (14 removed)
    # right: both heavy weights sit in different rows, so NM and TOPK both keep them (nothing removed)
    assert costs.tolist() == [[[0.0, 8.0, 14.0], [0.0, 0.0, 0.0]]]


def test_concentrated_block_goes_topk_before_a_spread_block_of_the_same_mass():
    s = _two_blocks()
    ratios = (0.0, 0.5, 0.5)
    # the summed-score rule sees 16 < 16.5 and sends the spread block to TOPK, removing 14 of its 16
    by_score = hybrid_tiers(s, ratios, "layer", None, bs=4, n=2, m=4, k=2, rule="score")
    assert by_score.tolist() == [[TOPK, NM]]
    # the loss rule sends the concentrated block to TOPK (it loses nothing) and removes 8 instead of 14
    by_loss = hybrid_tiers(s, ratios, "layer", None, bs=4, n=2, m=4, k=2, rule="loss")
    assert by_loss.tolist() == [[NM, TOPK]]


def _brute_force(cost: torch.Tensor, counts: tuple[int, int, int], prev: list[int] | None) -> float:
    best = float("inf")
    for tiers in set(itertools.permutations([DENSE] * counts[0] + [NM] * counts[1] + [TOPK] * counts[2])):
        if prev is not None and any(t < p for t, p in zip(tiers, prev)):
            continue
        best = min(best, sum(float(cost[i, t]) for i, t in enumerate(tiers)))
    return best


@settings(max_examples=80, deadline=None)
@given(
    blocks=st.integers(2, 7),
    d=st.integers(0, 4),
    n=st.integers(0, 4),
    with_previous=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_min_loss_assignment_is_optimal_and_holds_the_counts(blocks, d, n, with_previous, seed):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(1, blocks, 3, generator=g, dtype=torch.float64).pow(3)
    cost[..., DENSE] = 0.0
    total = d + n + 1
    ratios = (d / total, n / total, 1 - (d + n) / total)
    prev = None
    if with_previous:
        prev = torch.randint(0, 3, (1, blocks), generator=g, dtype=torch.int8)
        prev[0, 0] = DENSE  # keeps at least one target feasible often enough
    try:
        counts = tuple(group_counts((1, blocks), ratios, "layer", prev)[0].tolist())
    except TierMapError:
        with pytest.raises(TierMapError, match="denser tier"):
            assign_tiers_min_loss(cost, ratios, "layer", prev)
        return
    tiers = assign_tiers_min_loss(cost, ratios, "layer", prev)
    assert tuple(int((tiers == c).sum()) for c in (DENSE, NM, TOPK)) == counts
    if prev is not None:
        assert (tiers >= prev).all()
    got = sum(float(cost[0, i, int(t)]) for i, t in enumerate(tiers[0]))
    assert got == pytest.approx(_brute_force(cost[0], counts, None if prev is None else prev[0].tolist()))


def test_min_loss_is_never_worse_than_the_score_rule_on_real_shaped_scores():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 128, generator=g).abs() * torch.rand(1, 128, generator=g) * 3
    for group in ("layer", "row"):
        costs = tier_costs(scores, 16, 2, 4, 15)
        old = assign_tiers(block_scores(scores, 16), (0.35, 0.45, 0.2), group)
        new = assign_tiers_min_loss(costs, (0.35, 0.45, 0.2), group)
        assert torch.equal(torch.bincount(old.flatten().long()), torch.bincount(new.flatten().long()))

        def removed(t, costs=costs):
            return float(costs.gather(2, t.long().unsqueeze(-1)).sum())

        assert removed(new) < removed(old)


def test_layer_counts_spread_over_rows_as_evenly_as_the_previous_map_allows():
    counts = group_counts((3, 4), (0.35, 0.45, 0.2), "row", layer_counts=(5, 4, 3))
    assert counts.sum(0).tolist() == [5, 4, 3]
    assert counts[:, 0].tolist() == [2, 2, 1] and counts[:, 2].tolist() == [1, 1, 1]
    prev = torch.tensor([[DENSE, NM, NM, TOPK], [DENSE, DENSE, DENSE, NM], [DENSE, DENSE, NM, TOPK]])
    counts = group_counts((3, 4), (0.35, 0.45, 0.2), "row", prev, layer_counts=(4, 5, 3))
    assert counts.sum(0).tolist() == [4, 5, 3]
    assert (counts[:, 0] <= (prev == DENSE).sum(1)).all()
    assert (counts[:, 0] + counts[:, 1] <= (prev <= NM).sum(1)).all()
    with pytest.raises(TierMapError, match="denser tier"):
        group_counts((3, 4), (0.35, 0.45, 0.2), "row", prev, layer_counts=(7, 3, 2))
    with pytest.raises(TierMapError, match="do not cover"):
        group_counts((3, 4), (0.35, 0.45, 0.2), "row", layer_counts=(7, 3, 3))


# -- layer-wise allocation (OWL) on a tiny model ---------------------------------------------------------


def _prune(layer_allocation, **kw):
    from tiny_models import random_tokens, tiny_model

    from hf_hybrid_sparse import HybridSparseConfig, apply_hybrid_sparsity

    model = tiny_model("llama")
    cfg = HybridSparseConfig(nsamples=4, seqlen=32, layer_allocation=layer_allocation, **kw)
    return model, apply_hybrid_sparsity(model, cfg, random_tokens(4, 32))


@pytest.mark.parametrize("group", ["layer", "row"])
def test_owl_spreads_tiers_across_layers_and_holds_the_model_wide_counts_exactly(group):
    _, uniform = _prune("uniform", tier_group=group)
    _, owl = _prune("owl", tier_group=group, owl_lambda=0.2)
    assert owl.tier_totals() == uniform.tier_totals()
    per_layer = {m.name: m.tier_counts for m in owl.modules}
    flat = {m.name: m.tier_counts for m in uniform.modules}
    assert per_layer != flat  # the allocation is not uniform
    shifts = owl.allocation["density_shifts"]
    assert shifts[0] == pytest.approx(-shifts[1])  # two equal blocks: weighted mean zero
    denser = 0 if shifts[0] > 0 else 1
    for m in owl.modules:  # the block with more outliers got more DENSE blocks, the other fewer
        block = int(m.name.split(".")[2])
        more = per_layer[m.name]["dense"] - flat[m.name]["dense"]
        assert (more > 0) if block == denser else (more < 0), m.name
        assert per_layer[m.name]["nm"] == flat[m.name]["nm"]
    assert "allocation: owl" in owl.summary()


def test_owl_unstructured_keeps_the_model_wide_sparsity():
    _, owl = _prune("owl", pattern="unstructured", sparsity=0.5)
    assert owl.sparsity == pytest.approx(0.5, abs=1 / 64)
    layer_sparsity = {round(m.sparsity, 3) for m in owl.modules}
    assert len(layer_sparsity) == 2  # one per decoder block


@pytest.mark.parametrize("allocation", ["owl"])
def test_allocation_across_progressive_iterations_never_moves_a_block_denser(allocation):
    from tiny_models import random_tokens

    from hf_hybrid_sparse import HybridSparseConfig, apply_hybrid_sparsity, tier_maps

    model, first = _prune(allocation, tier_ratios=(0.7, 0.3, 0.0), owl_lambda=0.2)
    before = {k: v.clone() for k, v in tier_maps(model).items()}
    for ratios in [(0.5, 0.4, 0.1), (0.35, 0.45, 0.2), (0.35, 0.45, 0.2)]:
        cfg = HybridSparseConfig(
            nsamples=4, seqlen=32, tier_ratios=ratios, layer_allocation=allocation, owl_lambda=0.2
        )
        report = apply_hybrid_sparsity(model, cfg, random_tokens(4, 32))
        _, uniform = _prune("uniform", tier_ratios=ratios)
        assert report.tier_totals() == uniform.tier_totals()
        after = tier_maps(model)
        for name, prev in before.items():
            assert (after[name] >= prev).all(), name
        before = {k: v.clone() for k, v in after.items()}


def test_owl_is_refused_for_nm_patterns():
    from hf_hybrid_sparse import ConfigError, HybridSparseConfig

    with pytest.raises(ConfigError, match="layer_allocation"):
        HybridSparseConfig(pattern="2:4", layer_allocation="owl")
    with pytest.raises(ConfigError, match="owl_lambda"):
        HybridSparseConfig(layer_allocation="owl", owl_lambda=0.7)
