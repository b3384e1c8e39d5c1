"""The CPU kernel (built here on first use, as in CI): exact against the dense masked product everywhere."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from procs import subprocess_env
from tiny_models import random_tokens, tiny_model

from hf_hybrid_sparse import (
    HybridSparseConfig,
    apply_hybrid_sparsity,
    convert_to_dense,
    convert_to_hybrid_kernels,
)
from hf_hybrid_sparse.kernels import cpu
from hf_hybrid_sparse.kernels.linear import HybridSparseLinear
from hf_hybrid_sparse.kernels.packing import FIELDS, pack, unpack
from hf_hybrid_sparse.pruning.patterns import DENSE, NM, TOPK, expand_tiers, hybrid_mask

TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert cpu.available(), "the CPU kernel must build here (g++ is on this machine and in CI)"


def _weight(out_f, in_f, dtype, k=15, seed=0, tiers=None):
    """A random hybrid weight; the default tier map mixes all-DENSE, all-NM, all-TOPK and mixed block-rows."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = out_f // 16, in_f // 16
    if tiers is None:
        tiers = torch.randint(0, 3, (rows, cols), generator=g, dtype=torch.int8)
        tiers[0] = DENSE
        if rows > 1:
            tiers[1] = NM
        if rows > 2:
            tiers[2] = TOPK
    w = torch.randn(out_f, in_f, generator=g)
    mask = hybrid_mask(torch.rand(out_f, in_f, generator=g), tiers, 16, 2, 4, k)
    if k > 0:  # NM/TOPK blocks sparser than their tier (re-pruned layers): padded slots must stay exact
        dense = expand_tiers(tiers, 16) == DENSE
        mask &= (torch.rand(out_f, in_f, generator=g) > 0.1) | dense
    w = (w * mask).to(dtype)
    return w, mask, tiers


def _check(y, w, x, bias, dtype):
    ref = x.float() @ w.float().t() + (0 if bias is None else bias.float())
    err = (y.float() - ref).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [1, 2])
def test_every_path_is_exact_against_the_dense_masked_product(dtype, threads):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for out_f, in_f, k in ((48, 80, 15), (64, 128, 0), (96, 64, 7), (32, 48, 255)):
            w, mask, tiers = _weight(out_f, in_f, dtype, k=k, seed=out_f + k)
            packed = pack(w, mask, tiers, k)
            tensors = [packed.tensors[f] for f in FIELDS]
            assert torch.equal(cpu.unpack(tensors, out_f, in_f, k), unpack(packed))
            bias = torch.randn(out_f).to(dtype)
            for tokens in (1, 2, 3, 4, 5, 8, 9, 16, 17, 40):
                x = torch.randn(tokens, in_f).to(dtype)
                _check(cpu.linear(x, tensors, bias, out_f, k), w, x, bias, dtype)
                _check(cpu.linear(x, tensors, None, out_f, k), w, x, None, dtype)
    finally:
        torch.set_num_threads(saved)


def test_prefill_split_into_many_panels_is_exact():
    """Prefill normally unpacks small layers in one panel; force one block-row per panel."""
    w, mask, tiers = _weight(96, 80, torch.float32, k=15, seed=3)
    packed = pack(w, mask, tiers, 15)
    tensors = [packed.tensors[f] for f in FIELDS]
    x = torch.randn(40, 80)
    before = torch.ops.hf_hybrid_sparse.set_panel(4096, 16)
    try:
        _check(cpu.linear(x, tensors, None, 96, 15), w, x, None, torch.float32)
    finally:
        torch.ops.hf_hybrid_sparse.set_panel(*before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_tiles_and_panels_are_exact(dtype, threads):
    """Prefill runs block-sparse tiles (fp32 with AVX-512, bf16 with AVX512-BF16; layers of 32 block-rows or
    more) or unpacked panels and the BLAS: both exact, with partial and several token tiles, one block-row per
    panel, k from 0 to 256, and a layer too small for the tiles."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    before = torch.ops.hf_hybrid_sparse.set_prefill(0)
    try:
        for out_f, in_f, k in ((512, 80, 15), (528, 128, 0), (544, 64, 7), (512, 48, 256), (48, 80, 15)):
            w, mask, tiers = _weight(out_f, in_f, dtype, k=k, seed=out_f + k)
            tensors = [pack(w, mask, tiers, k).tensors[f] for f in FIELDS]
            bias = torch.randn(out_f).to(dtype)
            for mode, l2 in ((0, before[1]), (0, 0), (1, before[1])):
                torch.ops.hf_hybrid_sparse.set_prefill(mode, l2)
                for tokens in (17, 32, 33, 100):
                    x = torch.randn(tokens, in_f).to(dtype)
                    _check(cpu.linear(x, tensors, bias, out_f, k), w, x, bias, dtype)
    finally:
        torch.ops.hf_hybrid_sparse.set_prefill(*before)
        torch.set_num_threads(saved)


def test_layer_paths_agree_and_accept_non_contiguous_input():
    w, mask, tiers = _weight(64, 96, torch.float32)
    layer = HybridSparseLinear(pack(w, mask, tiers, 15), torch.randn(64))
    ref_layer = HybridSparseLinear(pack(w, mask, tiers, 15), layer.bias.detach(), path="reference")
    x = torch.randn(96, 3, 5).transpose(0, 2)  # [5, 3, 96], non-contiguous
    assert not x.is_contiguous() and layer._choose(x) == "cpu"
    with torch.no_grad():
        assert torch.allclose(layer(x), ref_layer(x), atol=1e-5)
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, w, layer.bias), atol=1e-5)


def test_a_layer_holds_only_packed_bytes_and_derives_weight_mask_and_tier_map():
    w, mask, tiers = _weight(64, 128, torch.bfloat16)
    layer = HybridSparseLinear.from_linear(_linear(w, mask, tiers))
    held = {n for n, _ in layer.named_buffers()} | {n for n, _ in layer.named_parameters()}
    assert held == {*FIELDS, "nm_pad", "topk_pad", "pack_format_version"}
    assert layer.nbytes() < 0.65 * w.numel() * w.element_size()
    assert torch.equal(layer.dense_weight(), w)
    assert torch.equal(layer.mask(), mask)  # exact, padded slots included
    assert torch.equal(layer.tier_map(), tiers)


def test_nm_groups_in_any_order_are_exact_and_a_repeated_position_is_refused():
    """Tensors from elsewhere may order a group's two positions either way; the kernels read them ascending
    (the 6 pairs of distinct columns), so the layer reorders them, and refuses a group naming one column twice."""
    from hf_hybrid_sparse.bits import pack_2bit, unpack_2bit
    from hf_hybrid_sparse.errors import PackingError
    from hf_hybrid_sparse.kernels.packing import PackedHybrid

    w, mask, tiers = _weight(32, 64, torch.bfloat16, tiers=torch.full((2, 4), NM, dtype=torch.int8))
    t = dict(pack(w, mask, tiers, 15).tensors)
    idx = unpack_2bit(t["nm_idx"], 8).reshape(-1, 16, 4, 2).flip(-1)  # every group descending
    t["nm_idx"] = pack_2bit(idx.reshape(-1, 16, 8)).contiguous()
    t["nm_vals"] = t["nm_vals"].reshape(-1, 16, 4, 2).flip(-1).reshape(-1, 16, 8).contiguous()
    layer = HybridSparseLinear(PackedHybrid(32, 64, 15, t))
    with torch.no_grad():
        for tokens in (1, 3, 16):
            x = torch.randn(tokens, 64).to(torch.bfloat16)
            _check(layer(x), w, x, None, torch.bfloat16)
    idx[0, 0, 0, 1] = idx[0, 0, 0, 0]
    t["nm_idx"] = pack_2bit(idx.reshape(-1, 16, 8)).contiguous()
    with pytest.raises(PackingError, match="same position twice"):
        HybridSparseLinear(PackedHybrid(32, 64, 15, t))


def _linear(w, mask, tiers):
    from hf_hybrid_sparse.state import ParamSparsity, set_param_state

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).to(w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    set_param_state(lin, "weight", ParamSparsity(mask=mask, tier_map=tiers, pattern="hybrid", method="wanda"))
    return lin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_converted_model_generates_like_the_pruned_model(dtype):
    model = tiny_model("llama").to(dtype)
    apply_hybrid_sparsity(model, HybridSparseConfig(nsamples=4, seqlen=32), random_tokens(4, 32))
    prompt = random_tokens(1, 8, seed=7)
    with torch.no_grad():
        ref_logits = model(input_ids=random_tokens(2, 24, seed=8)).logits
        ref = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    report = convert_to_hybrid_kernels(model)
    assert len(report) == 14 and report.bytes_after < 0.7 * report.bytes_before
    with torch.no_grad():
        got_logits = model(input_ids=random_tokens(2, 24, seed=8)).logits
        got = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    assert torch.allclose(got_logits.float(), ref_logits.float(), atol=TOL[dtype] * 50, rtol=TOL[dtype] * 10)
    if dtype == torch.float32:
        assert torch.equal(got, ref)
    model.to(
        torch.bfloat16 if dtype == torch.float32 else torch.float32
    )  # a later dtype change keeps working
    with torch.no_grad():
        model(input_ids=prompt)
    convert_to_dense(model)


def test_a_dtype_without_kernel_warns_once_and_uses_the_reference_path(caplog):
    w, mask, tiers = _weight(32, 32, torch.float64)
    layer = HybridSparseLinear(pack(w, mask, tiers, 15))
    x = torch.randn(2, 32, dtype=torch.float64)
    with caplog.at_level("WARNING"):
        y1, y2 = layer(x), layer(x)
    assert caplog.text.count("no CPU kernel for torch.float64") == 1
    assert torch.allclose(y1, x @ w.t()) and torch.equal(y1, y2)


def test_gradients_take_the_reference_path():
    w, mask, tiers = _weight(32, 32, torch.float32)
    layer = HybridSparseLinear(pack(w, mask, tiers, 15))
    x = torch.randn(3, 32, requires_grad=True)
    assert layer._choose(x) == "reference"
    layer(x).sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(3, -1), atol=1e-5)


FALLBACK = textwrap.dedent(
    """
    import logging, torch
    import hf_hybrid_sparse
    from hf_hybrid_sparse.kernels import cpu
    from hf_hybrid_sparse.kernels.linear import HybridSparseLinear
    from hf_hybrid_sparse.kernels.packing import pack
    from test_cpu_kernel import _weight
    w, mask, tiers = _weight(32, 48, torch.float32)
    layer = HybridSparseLinear(pack(w, mask, tiers, 15))
    x = torch.randn(3, 48)
    y = layer(x)
    assert torch.allclose(y, x @ w.t(), atol=1e-5)
    print("PATH", layer._choose(x), cpu.available())
    """
)


def test_without_a_compiler_one_warning_and_the_reference_path(tmp_path):
    env = subprocess_env(
        TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), CXX="/nonexistent/g++", CC="/nonexistent/gcc"
    )
    res = subprocess.run(
        [sys.executable, "-c", FALLBACK], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "PATH reference False" in res.stdout
    assert res.stderr.count("the CPU kernel could not be built") == 1


def test_forcing_the_reference_path_by_environment():
    env = subprocess_env(**{cpu.ENV: "reference"})
    res = subprocess.run(
        [sys.executable, "-c", FALLBACK], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "PATH reference False" in res.stdout and "could not be built" not in res.stderr


PORTABLE = textwrap.dedent(
    """
    import torch
    from hf_hybrid_sparse.kernels import cpu
    assert cpu.available()
    assert not torch.ops.hf_hybrid_sparse.has_avx512()  # the portable loops, not the AVX-512 code
    import test_cpu_kernel as t
    for dtype in (torch.float32, torch.bfloat16):
        t.test_every_path_is_exact_against_the_dense_masked_product(dtype, 2)
    import test_storage  # the load-time mask checks' portable loops
    test_storage.test_native_mask_checks_agree_with_the_numpy_path()
    print("PORTABLE_OK")
    """
)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the AVX2 variant is an x86-64 build")
def test_the_portable_build_is_exact_too(tmp_path):
    env = subprocess_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), **{cpu.ARCH_ENV: "-march=x86-64-v3"})
    res = subprocess.run(
        [sys.executable, "-c", PORTABLE], capture_output=True, text=True, env=env, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "PORTABLE_OK" in res.stdout


def test_torch_compile_sees_one_op():
    w, mask, tiers = _weight(32, 48, torch.float32)
    packed = pack(w, mask, tiers, 15)
    tensors = [packed.tensors[f] for f in FIELDS]
    x = torch.randn(2, 48)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:  # the registered fake implementation gives the output's shape and dtype
        y = torch.ops.hf_hybrid_sparse.hybrid_linear(
            mode.from_tensor(x), [mode.from_tensor(t) for t in tensors], None, 32, 15
        )
    assert y.shape == (2, 32) and y.dtype == x.dtype
    layer = HybridSparseLinear(packed, torch.randn(32))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # fullgraph: no break around the op
    with torch.no_grad():
        assert torch.allclose(compiled(x), layer(x), atol=1e-6)


@pytest.mark.parametrize("family, compressed", [("llama", False), ("gpt2", False), ("llama", True)])
def test_use_kernels_packs_each_layer_as_it_loads(tmp_path, monkeypatch, family, compressed):
    from transformers import AutoModelForCausalLM

    from hf_hybrid_sparse import save_pretrained, sparsity_masks
    from hf_hybrid_sparse.checkpoint import packed_load

    model = tiny_model(family)
    apply_hybrid_sparsity(model, HybridSparseConfig(method="magnitude"))
    save_pretrained(model, tmp_path / "m", compressed=compressed)
    packed_while_loading = []
    real = packed_load.PackOnLoad._pack
    monkeypatch.setattr(
        packed_load.PackOnLoad,
        "_pack",
        lambda self, w: packed_while_loading.append(self._spec[0]) or real(self, w),
    )
    fast = AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", quantization_config=HybridSparseConfig(use_kernels=True)
    )
    assert sorted(packed_while_loading) == sorted(sparsity_masks(model))  # every layer, packed as it arrived
    layers = [m for m in fast.modules() if isinstance(m, HybridSparseLinear)]
    assert len(layers) == len(packed_while_loading) and not list(sparsity_masks(fast))
    probe = random_tokens(1, 10, seed=2)
    with torch.no_grad():
        assert torch.allclose(fast(input_ids=probe).logits, model(input_ids=probe).logits, atol=1e-5)


def test_releasing_the_pages_of_a_packed_weight_keeps_every_value(tmp_path):
    """The packed load hands the dense weight's pages back to the kernel; whoever still reads them (a
    shared or tied tensor) must see the same values, from the file or from anonymous memory."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from hf_hybrid_sparse.checkpoint.packed_load import _release_pages

    weights = {"a": torch.randn(512, 700), "b": torch.randn(3, 5)}
    save_file(weights, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as fh:
        mapped = {k: fh.get_tensor(k) for k in weights}
    anonymous = torch.randn(1024, 1024)
    copy = anonymous.clone()
    for t in (*mapped.values(), anonymous, anonymous[1:, 3:]):
        _release_pages(t)
    assert all(torch.equal(mapped[k], weights[k]) for k in weights)
    assert torch.equal(anonymous, copy)
