"""SparseGPT against an independent reference written here from the paper (Frantar & Alistarh 2023, Alg. 1).

The reference walks the columns one at a time with the full inverse-Hessian Cholesky factor, in float64,
with none of the package's lazy batching: for column j it (re)selects the mask when a selection block
starts, then ``err = (w_j - q_j) / U_jj`` and ``W[:, j:] -= err * U[j, j:]`` (U = upper Cholesky factor
of (H + damp * mean(diag H) * I)^-1). Saliency is ``w^2 / U_cc^2`` of the current, already updated
weights. Masks must agree exactly and the updated weights to float32 precision.
"""

import math

import pytest
import torch

from hf_hybrid_sparse.pruning.sparsegpt import hessian_factor, sparsegpt_prune


def _problem(rows=32, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    # correlated inputs with uneven scales, as real activations are
    x = torch.randn(tokens, cols, generator=g) @ (
        torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g)
    )
    x = x * torch.linspace(0.2, 3.0, cols)
    h = 2 * x.T @ x / tokens
    return w, h


def _upper_inverse_factor(h, damp):
    h = h.double()
    h = h + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(torch.linalg.inv(h), upper=True)


def _keep_top(scores, k):
    """Keep-mask of the k highest scores of a 1-D tensor (ties to the earlier index)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))[:k]
        keep[order] = True
    return keep


def reference(w, h, *, select, damp=0.01):
    """OBS pruning column by column; ``select(W, U, j)`` returns a keep-mask for columns it decides, or None."""
    W = w.double().clone()
    U = _upper_inverse_factor(h, damp)
    rows, cols = W.shape
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for j in range(cols):
        chosen = select(W, U, j)
        if chosen is not None:
            cols_, mask = chosen
            keep[:, cols_] = mask
        q = torch.where(keep[:, j], W[:, j], torch.zeros_like(W[:, j]))
        err = (W[:, j] - q) / U[j, j]
        W[:, j:] -= err.unsqueeze(1) * U[j, j:].unsqueeze(0)
        W[:, j] = q
    return W, keep


def _saliency(W, U, cols):
    d = torch.diag(U)[cols]
    return W[:, cols] ** 2 / d**2


def select_unstructured_layer(sparsity, chunk):
    """The paper: every `chunk` columns, prune the lowest-saliency share of the chunk over all rows."""

    def select(W, U, j):
        if j % chunk:
            return None
        cols = list(range(j, min(j + chunk, W.shape[1])))
        s = _saliency(W, U, cols)
        n_prune = math.floor(sparsity * W.shape[0] * (j + len(cols))) - math.floor(sparsity * W.shape[0] * j)
        keep = _keep_top(s.reshape(-1), s.numel() - n_prune).reshape(s.shape)
        return cols, keep

    return select


def select_unstructured_row(sparsity, chunk):
    """Per-row quota inside each chunk (the package's comparison_group="row")."""

    def select(W, U, j):
        if j % chunk:
            return None
        cols = list(range(j, min(j + chunk, W.shape[1])))
        s = _saliency(W, U, cols)
        n_prune = math.floor(sparsity * (j + len(cols))) - math.floor(sparsity * j)
        keep = torch.stack([_keep_top(row, len(cols) - n_prune) for row in s])
        return cols, keep

    return select


def select_nm(n, m):
    """N:M (N kept): at the start of each group of M columns, keep the N most salient of each row."""

    def select(W, U, j):
        if j % m:
            return None
        cols = list(range(j, j + m))
        s = _saliency(W, U, cols)
        return cols, torch.stack([_keep_top(row, n) for row in s])

    return select


@pytest.fixture(params=[False, True], ids=["torch-loop", "native-loop"])
def native(request):
    if request.param:
        from hf_hybrid_sparse import native as ext

        assert ext.available(), "the C++ extension builds here and in CI"
    return request.param


def _compare(w, h, ref_select, native, **kwargs):
    new_w, keep, _ = sparsegpt_prune(w, h, native=native, **kwargs)
    ref_w, ref_keep = reference(w, h, select=ref_select)
    assert torch.equal(keep, ref_keep), f"{int((keep != ref_keep).sum())} mask entries differ"
    assert (new_w[~keep] == 0).all()
    scale = ref_w.abs().max().item()
    assert torch.allclose(new_w.double(), ref_w, atol=2e-5 * scale, rtol=1e-4), (
        (new_w.double() - ref_w).abs().max()
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_unstructured_layer_matches_the_paper(seed, native):
    w, h = _problem(seed=seed)
    _compare(
        w,
        h,
        select_unstructured_layer(0.5, 32),
        native,
        pattern="unstructured",
        sparsity=0.5,
        group="layer",
        blocksize=32,
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_unstructured_row_quota_matches_the_reference(seed, native):
    w, h = _problem(seed=seed)
    _compare(
        w,
        h,
        select_unstructured_row(0.5, 16),
        native,
        pattern="unstructured",
        sparsity=0.5,
        group="row",
        blocksize=16,
    )


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_matches_the_reference(nm, native):
    w, h = _problem(seed=3)
    _compare(w, h, select_nm(*nm), native, pattern="nm", nm=nm, blocksize=32)


def test_the_reference_detects_the_defects_it_is_meant_to_catch():
    """Sanity of the reference itself: wrong saliency or no OBS update give different results."""
    w, h = _problem(seed=4)
    good_w, good_keep = reference(w, h, select=select_nm(2, 4))

    def wrong_saliency(W, U, j):
        if j % 4:
            return None
        cols = list(range(j, j + 4))
        s = W[:, cols] ** 2 / torch.diag(U)[cols]  # w^2 / d instead of w^2 / d^2
        return cols, torch.stack([_keep_top(row, 2) for row in s])

    _, bad_keep = reference(w, h, select=wrong_saliency)
    assert not torch.equal(bad_keep, good_keep)
    new_w, keep, _ = sparsegpt_prune(w, h, pattern="nm", nm=(2, 4), blocksize=32)
    assert not torch.allclose(w * keep, new_w, atol=1e-3), "the OBS update changes the kept weights"


@pytest.mark.parametrize("pattern", ["hybrid", "unstructured"])
def test_native_and_torch_loops_agree_with_old_masks(pattern):
    """Hybrid tiers (TOPK per chunk, NM per group on NM rows only) and re-pruning over an old mask."""
    w, h = _problem(rows=64, cols=128, seed=6)
    old = torch.rand(64, 128, generator=torch.Generator().manual_seed(1)) > 0.2
    kw = dict(pattern=pattern, old_mask=old, blocksize=64)
    a_w, a_keep, a_t = sparsegpt_prune(w, h, native=False, **kw)
    b_w, b_keep, b_t = sparsegpt_prune(w, h, native=True, **kw)
    assert torch.equal(a_keep, b_keep) and not (a_keep & ~old).any()
    assert (a_t is None and b_t is None) or torch.equal(a_t, b_t)
    assert torch.allclose(a_w, b_w, atol=1e-5 * a_w.abs().max().item())


@pytest.mark.parametrize("pattern,kwargs", [("nm", {"nm": (2, 4)}), ("nm", {"nm": (4, 8)})])
def test_lazy_batch_size_does_not_change_the_result(pattern, kwargs, native):
    """Lazy batching is a reordering of the same updates: any column chunk gives the same masks and weights."""
    w, h = _problem(rows=48, cols=128, seed=5)
    results = [
        sparsegpt_prune(w, h, pattern=pattern, blocksize=b, native=native, **kwargs) for b in (8, 16, 64, 128)
    ]
    base_w, base_keep, _ = results[0]
    for new_w, keep, _ in results[1:]:
        assert torch.equal(keep, base_keep)
        assert torch.allclose(new_w, base_w, atol=1e-4 * base_w.abs().max().item())


def test_a_shared_hessian_factor_gives_the_same_result():
    """q/k/v (and gate/up) see the same input: the factor computed once must change nothing."""
    w, h = _problem(rows=32, cols=64, seed=7)
    factor = hessian_factor(h, 0.01)
    a = sparsegpt_prune(w, h, pattern="hybrid", dampening=0.01)
    b = sparsegpt_prune(w, factor, pattern="hybrid")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_layers_sharing_an_input_factor_the_hessian_once(monkeypatch):
    from hf_hybrid_sparse import HybridSparseConfig
    from hf_hybrid_sparse.pruning import matrix
    from hf_hybrid_sparse.pruning.scoring import InputStats

    calls = []
    real = matrix.hessian_factor
    monkeypatch.setattr(matrix, "hessian_factor", lambda *a: calls.append(1) or real(*a))
    stats = InputStats(64, torch.device("cpu"), hessian=True)
    stats.add(torch.randn(256, 64))
    config = HybridSparseConfig(method="sparsegpt", pattern="hybrid")
    for seed in range(3):
        matrix.prune_matrix(torch.randn(32, 64, generator=torch.Generator().manual_seed(seed)), config, stats)
    assert len(calls) == 1
    stats.add(torch.randn(8, 64))  # new tokens: the cached factor is stale
    matrix.prune_matrix(torch.randn(32, 64), config, stats)
    assert len(calls) == 2


def test_a_not_positive_definite_hessian_is_damped_more_and_said(caplog):
    import logging

    h = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.05] * 4))  # rounding can leave H slightly indefinite
    with caplog.at_level(logging.WARNING, logger="hf_hybrid_sparse"):
        factor = hessian_factor(h, 0.01)
    assert factor.damp > 0.01
    assert "not positive definite with dampening=0.01" in caplog.text
    with pytest.raises(Exception, match="not positive definite even with"):
        hessian_factor(-torch.eye(16), 0.01)


@pytest.mark.parametrize("native", [False, True])
def test_a_transposed_weight_gives_the_same_result(native):
    """GPT-2's Conv1D hands over ``weight.T``: a non-contiguous view must prune exactly like a copy."""
    w, h = _problem(rows=32, cols=64, seed=8)
    a = sparsegpt_prune(w, h, pattern="hybrid", native=native)
    b = sparsegpt_prune(w.t().contiguous().t(), h.t().contiguous().t(), pattern="hybrid", native=native)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("group", ["row", "layer"])
def test_tiers_rechosen_per_chunk_keep_each_chunks_counts_and_the_previous_map(group):
    """With the loss rule, each chunk's tiers are chosen again on the updated weights with the same counts."""
    from hf_hybrid_sparse.pruning.patterns import DENSE, NM, TOPK, check_hybrid

    w, h = _problem(rows=64, cols=256, seed=0)
    kw = dict(pattern="hybrid", tier_group=group, blocksize=64)
    _, _, upfront = sparsegpt_prune(w, h, rechoose_tiers=False, **kw)
    new_w, keep, tiers = sparsegpt_prune(w, h, rechoose_tiers=True, **kw)
    assert not torch.equal(tiers, upfront), "the updated weights changed some block's tier"
    for c0 in range(0, 16, 4):  # chunks of 64 columns = 4 block columns
        a, b = upfront[:, c0 : c0 + 4], tiers[:, c0 : c0 + 4]
        if group == "layer":
            a, b = a.reshape(1, -1), b.reshape(1, -1)
        for code in (DENSE, NM, TOPK):
            assert torch.equal((a == code).sum(1), (b == code).sum(1))
    assert check_hybrid(keep, tiers, 16, 2, 4, 15) == []
    assert (new_w[~keep] == 0).all()
    previous = upfront.clone()
    previous[previous == DENSE] = NM  # a later iteration: nothing may move back to DENSE
    _, _, again = sparsegpt_prune(w, h, previous_tiers=previous, tier_ratios=(0.0, 0.6, 0.4), **kw)
    assert (again >= previous).all()


@pytest.mark.parametrize("n,spread", [(64, 1.0), (300, 1e4), (1100, 1e6)])
def test_the_inverse_factor_is_the_papers_upper_cholesky_of_the_inverse(n, spread):
    """hessian_factor's factor (one factorisation of the reversed matrix and a triangular inverse) is the
    paper's cholesky(inverse(H + damp * mean(diag H) * I), upper=True), checked in float64 for Hessians
    from well to badly conditioned."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2 * n, n, generator=g, dtype=torch.float64) * torch.logspace(
        0, math.log10(spread), n, dtype=torch.float64
    )
    h = (2 * x.T @ x / x.shape[0]).float()
    factor = hessian_factor(h, 0.01).hinv
    ref = _upper_inverse_factor(h, 0.01)
    assert torch.equal(factor, factor.triu()) and (torch.diag(factor) > 0).all()
    err = (factor.double() - ref).abs().max() / ref.abs().max()
    assert err < 2e-5, err
