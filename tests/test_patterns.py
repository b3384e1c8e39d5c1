import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_hybrid_sparse import DENSE, NM, TOPK, TierMapError
from hf_hybrid_sparse.pruning.patterns import (
    _sorted_keep,
    assign_tiers,
    block_scores,
    check_hybrid,
    hybrid_mask,
    nm_mask,
    tier_counts,
    unstructured_mask,
)


def test_tier_counts_rounding_rule_hand_checked():
    # 20 blocks at (0.35, 0.45, 0.20): 7 / 9 / 4 exactly
    assert tier_counts(20, (0.35, 0.45, 0.20)) == (7, 9, 4)
    # 10 blocks: 3.5 -> 4 (half up), 8.0 -> 8 cumulative, so 4 / 4 / 2
    assert tier_counts(10, (0.35, 0.45, 0.20)) == (4, 4, 2)
    # 3 blocks: 1.05 -> 1, 2.4 -> 2: 1 / 1 / 1
    assert tier_counts(3, (0.35, 0.45, 0.20)) == (1, 1, 1)
    assert tier_counts(7, (1.0, 0.0, 0.0)) == (7, 0, 0)
    assert tier_counts(7, (0.0, 0.0, 1.0)) == (0, 0, 7)


@given(
    n=st.integers(0, 500),
    a=st.floats(0, 1),
    b=st.floats(0, 1),
)
def test_tier_counts_always_partition(n, a, b):
    d = a
    nm = (1 - a) * b
    t = 1 - d - nm
    counts = tier_counts(n, (d, nm, max(t, 0.0)))
    assert sum(counts) == n and min(counts) >= 0
    assert abs(counts[0] - d * n) <= 0.5 + 1e-6
    assert abs(counts[0] + counts[1] - (d + nm) * n) <= 0.5 + 1e-6


def test_unstructured_row_and_layer_exact():
    torch.manual_seed(0)
    s = torch.rand(8, 10)
    m = unstructured_mask(s, 0.5, "row")
    assert (m.sum(1) == 5).all()
    # the kept ones are the 5 largest of each row
    assert torch.equal(m, s >= s.sort(dim=1, descending=True).values[:, 4:5])
    m = unstructured_mask(s, 0.3, "layer")
    assert int((~m).sum()) == math.floor(0.3 * 80)
    assert s[m].min() > s[~m].max()


def test_nm_mask_hand_checked():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.4, 0.3, 0.2]])
    assert nm_mask(s, 2, 4).tolist() == [[True, False, True, False, False, True, True, False]]


def test_hybrid_hand_checked_two_by_two_blocks():
    # 2x2 blocks of 4x4 weights; blocks scores: top-left is largest, bottom-right smallest
    s = torch.tensor(
        [
            [9.0, 9.0, 9.0, 9.0, 1.0, 5.0, 2.0, 4.0],
            [9.0, 9.0, 9.0, 9.0, 3.0, 1.0, 1.0, 6.0],
            [9.0, 9.0, 9.0, 9.0, 2.0, 1.0, 1.0, 1.0],
            [9.0, 9.0, 9.0, 9.0, 1.0, 1.0, 1.0, 1.0],
            [3.0, 3.0, 3.0, 3.0, 0.1, 0.2, 0.9, 0.3],
            [3.0, 3.0, 3.0, 3.0, 0.1, 0.1, 0.1, 0.1],
            [3.0, 3.0, 3.0, 3.0, 0.1, 0.1, 0.1, 0.1],
            [3.0, 3.0, 3.0, 3.0, 0.1, 0.1, 0.1, 0.8],
        ]
    )
    bs = block_scores(s, 4)
    assert torch.allclose(bs, torch.tensor([[144.0, 32.0], [48.0, 3.4]]))
    tiers = assign_tiers(bs, (0.25, 0.5, 0.25), "layer")
    assert tiers.tolist() == [[DENSE, NM], [NM, TOPK]]
    mask = hybrid_mask(s, tiers, 4, 2, 4, 2)
    assert mask[:4, :4].all()
    # NM block top-right, rows: keep the 2 largest of 4
    assert mask[0, 4:].tolist() == [False, True, False, True]
    assert mask[1, 4:].tolist() == [True, False, False, True]
    # TOPK block bottom-right keeps its 2 largest: 0.9 at (4,6) and 0.8 at (7,7)
    kept = mask[4:, 4:].nonzero().tolist()
    assert kept == [[0, 2], [3, 3]]
    assert check_hybrid(mask, tiers, 4, 2, 4, 2) == []
    # and a violating mask is caught
    bad = mask.clone()
    bad[4, 4] = True
    assert check_hybrid(bad, tiers, 4, 2, 4, 2)


def test_row_tier_group_ranks_within_each_block_row():
    bs = torch.tensor([[1.0, 2.0, 3.0, 4.0], [40.0, 30.0, 20.0, 10.0]])
    tiers = assign_tiers(bs, (0.25, 0.5, 0.25), "row")
    assert tiers.tolist() == [[TOPK, NM, NM, DENSE], [DENSE, NM, NM, TOPK]]
    layer = assign_tiers(bs, (0.25, 0.5, 0.25), "layer")
    assert (layer == DENSE).sum() == 2 and layer[1, 0] == DENSE and layer[1, 1] == DENSE


def test_previous_tiers_never_move_denser_and_move_the_weakest():
    prev = torch.tensor([[DENSE, DENSE, NM, TOPK]], dtype=torch.int8)
    scores = torch.tensor([[1.0, 5.0, 100.0, 1000.0]])
    tiers = assign_tiers(scores, (0.25, 0.5, 0.25), "layer", prev)
    # the high-scoring TOPK and NM blocks cannot move up; the weaker DENSE block moves to NM
    assert tiers.tolist() == [[NM, DENSE, NM, TOPK]]
    # with one NM slot, the NM-eligible blocks compete by score: the weak ex-DENSE block goes to TOPK
    tiers = assign_tiers(scores, (0.25, 0.25, 0.5), "layer", prev)
    assert tiers.tolist() == [[TOPK, DENSE, NM, TOPK]]
    with pytest.raises(TierMapError, match="denser tier"):
        assign_tiers(scores, (0.75, 0.25, 0.0), "layer", prev)
    with pytest.raises(TierMapError, match="shape"):
        assign_tiers(scores, (0.25, 0.25, 0.5), "layer", prev.reshape(2, 2))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    cols=st.integers(1, 6),
    d=st.integers(0, 10),
    n=st.integers(0, 10),
    group=st.sampled_from(["row", "layer"]),
    seed=st.integers(0, 10_000),
)
def test_hybrid_masks_obey_tiers_exactly(rows, cols, d, n, group, seed):
    total = d + n + 5
    ratios = (d / total, n / total, 5 / total)
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(rows * 16, cols * 16, generator=g)
    tiers = assign_tiers(block_scores(s, 16), ratios, group)
    per_group = tiers.reshape(1, -1) if group == "layer" else tiers
    expect = tier_counts(per_group.shape[1], ratios)
    for row in per_group:
        assert tuple(int((row == c).sum()) for c in (DENSE, NM, TOPK)) == expect
    mask = hybrid_mask(s, tiers, 16, 2, 4, 15)
    assert check_hybrid(mask, tiers, 16, 2, 4, 15) == []
    kept = int(mask.sum())
    n_d, n_n, n_t = (int((tiers == c).sum()) for c in (DENSE, NM, TOPK))
    assert kept == n_d * 256 + n_n * 128 + n_t * 15
    # a sparser next iteration, scored on fresh weights, never moves a block to a denser tier
    sparser = (ratios[0] / 2, ratios[1] / 2, 1 - ratios[0] / 2 - ratios[1] / 2)
    nxt = assign_tiers(block_scores(torch.rand(rows * 16, cols * 16, generator=g), 16), sparser, group, tiers)
    assert (nxt.long() >= tiers.long()).all()
    for row in nxt.reshape(1, -1) if group == "layer" else nxt:
        assert tuple(int((row == c).sum()) for c in (DENSE, NM, TOPK)) == tier_counts(row.numel(), sparser)


def test_design_recipe_is_about_41_percent_sparse():
    s = torch.rand(64 * 16, 20 * 16)
    tiers = assign_tiers(block_scores(s, 16), (0.35, 0.45, 0.20), "layer")
    mask = hybrid_mask(s, tiers, 16, 2, 4, 15)
    sparsity = 1 - mask.float().mean().item()
    assert abs(sparsity - (0.45 * 0.5 + 0.20 * (1 - 15 / 256))) < 1e-3
    assert 0.40 < sparsity < 0.42


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 40),
    levels=st.integers(1, 6),
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_top_k_selection_is_a_stable_sort(rows, cols, levels, frac, seed):
    """The threshold selection equals "sort descending, stable, keep the first k": ties go to earlier
    indices (few distinct levels make many ties)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (rows, cols), generator=g).float() - 1.0  # -1 like a demoted weight
    k = round(frac * cols)
    expected = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
        expected.scatter_(-1, order, True)
    assert torch.equal(_sorted_keep(scores, k), expected)
