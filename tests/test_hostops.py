"""hostops: NumPy-backed select / scatter / zero tests agree with the torch ops they replace."""

import numpy as np
import pytest
import torch

from hf_hybrid_sparse.hostops import _CHUNK, count_outside, count_true, nonzero_bits, scatter, select


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_select_and_scatter_match_boolean_indexing(dtype):
    g = torch.Generator().manual_seed(0)
    values = (torch.randn(37, 48, generator=g) * 100).to(dtype)
    keep = torch.rand(37, 48, generator=g) > 0.45
    picked = select(values, keep)
    assert picked.dtype == dtype and picked.shape == (int(keep.sum()),)
    assert torch.equal(picked, values[keep])
    back = scatter(picked, keep)
    expected = torch.zeros_like(values)
    expected[keep] = values[keep]
    assert back.dtype == dtype and torch.equal(back, expected)
    fill = True if dtype == torch.bool else 7
    assert torch.equal(
        scatter(picked, keep, fill=fill), torch.where(keep, values, torch.tensor(fill, dtype=dtype))
    )


def test_select_of_a_non_contiguous_tensor_is_row_major():
    values = torch.arange(12.0).reshape(3, 4).t()  # [4, 3], not contiguous
    keep = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    assert select(values, keep).tolist() == [0.0, 8.0, 5.0, 2.0, 6.0, 10.0]


def test_scatter_refuses_a_count_mismatch_and_select_a_shape_mismatch():
    keep = torch.tensor([True, False, True])
    with pytest.raises(ValueError, match="3 values for 2 kept"):
        scatter(torch.ones(3), keep)
    with pytest.raises(ValueError, match="differ in shape"):
        select(torch.ones(4), keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonzero_counts_negative_zero_as_zero_and_nan_as_nonzero(dtype):
    w = torch.tensor([[0.0, -0.0, 1e-3], [float("nan"), -2.0, 0.0]], dtype=dtype)
    assert nonzero_bits(w).tolist() == [0b011100]
    keep = torch.tensor([[False, False, False], [True, False, True]])
    # nonzero where pruned: 1e-3 (col 2, row 0) and -2.0 (row 1, col 1)
    assert count_outside(w, keep) == 2 == int(((w != 0) & ~keep).sum())
    assert count_true(keep) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonzero_bits_across_chunks(dtype):
    # a size that is neither a whole number of chunks nor of bytes; zeros of both signs
    n = 2 * _CHUNK + 13
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, generator=g).to(dtype)
    w[torch.rand(n, generator=g) < 0.5] = 0.0
    w[torch.rand(n, generator=g) < 0.1] = -0.0
    expected = np.packbits((w != 0).numpy(), bitorder="little")
    assert np.array_equal(nonzero_bits(w.reshape(1, n)), expected)
    keep = torch.rand(n, generator=g) < 0.3
    assert count_outside(w, keep) == int(((w != 0) & ~keep).sum())
