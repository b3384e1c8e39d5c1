"""Packed hybrid format, HybridSparseLinear and the Triton decode kernel (interpreter on CPU, CUDA if present)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from procs import subprocess_env
from tiny_models import random_tokens, tiny_model

from hf_hybrid_sparse import HybridSparseConfig, apply_hybrid_sparsity
from hf_hybrid_sparse.errors import PackingError
from hf_hybrid_sparse.kernels.linear import HybridSparseLinear, convert_to_dense, convert_to_hybrid_kernels
from hf_hybrid_sparse.kernels.packing import dense_fp16_bytes, pack, unpack
from hf_hybrid_sparse.pruning.patterns import assign_tiers, block_scores, hybrid_mask


def random_hybrid(out_f, in_f, dtype=torch.float32, ratios=(0.35, 0.45, 0.20), seed=0, k=15):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    tiers = assign_tiers(block_scores(torch.rand(out_f, in_f, generator=g), 16), ratios, "layer")
    mask = hybrid_mask(w.float().abs(), tiers, 16, 2, 4, k)
    return w * mask, mask, tiers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_unpack_exact(dtype):
    w, mask, tiers = random_hybrid(64, 96, dtype)
    packed = pack(w, mask, tiers, 15)
    assert torch.equal(unpack(packed), w)
    # sparser-than-required masks (e.g. after SparseGPT zeroed a kept weight, or progressive intersections)
    mask2 = mask & (torch.rand(mask.shape) > 0.3)
    w2 = w * mask2
    assert torch.equal(unpack(pack(w2, mask2, tiers, 15)), w2)


def test_packed_bytes_match_the_design():
    w, mask, tiers = random_hybrid(4096, 4096, torch.float16)
    packed = pack(w, mask, tiers, 15)
    ratio = packed.nbytes() / dense_fp16_bytes(4096, 4096)
    # 0.35 x (512+4) + 0.45 x (288+4) + 0.20 x (45+4) bytes per 512-byte dense block (+4: block column)
    assert ratio == pytest.approx((0.35 * 516 + 0.45 * 292 + 0.20 * 49) / 512, abs=2e-3)
    assert ratio <= 0.65


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 16, 37])
def test_reference_forward_is_the_dense_masked_product(dtype, tokens):
    w, mask, tiers = random_hybrid(48, 64, dtype, seed=tokens)
    bias = torch.randn(48).to(dtype)
    layer = HybridSparseLinear(pack(w, mask, tiers, 15), bias, path="reference")
    x = torch.randn(2, tokens, 64).to(dtype)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w, bias))


def test_model_conversion_round_trip():
    model = tiny_model("llama")
    apply_hybrid_sparsity(model, HybridSparseConfig(nsamples=4, seqlen=32), random_tokens(4, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = random_tokens(2, 12, seed=3)
    with torch.no_grad():
        ref = model(input_ids=probe).logits
    names = convert_to_hybrid_kernels(model, path="reference")
    assert len(names) == 14 and isinstance(model.model.layers[0].self_attn.q_proj, HybridSparseLinear)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=probe).logits, ref, atol=1e-6)
    assert convert_to_dense(model) == names
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_gpt2_conv1d_converts_and_back():
    model = tiny_model("gpt2")
    apply_hybrid_sparsity(model, HybridSparseConfig(method="magnitude"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = random_tokens(1, 8, seed=3)
    with torch.no_grad():
        ref = model(input_ids=probe).logits
    convert_to_hybrid_kernels(model, path="reference")
    with torch.no_grad():
        assert torch.allclose(model(input_ids=probe).logits, ref, atol=1e-5)
    convert_to_dense(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_packed_state_dict_round_trip_and_version_check():
    w, mask, tiers = random_hybrid(32, 64)
    a = HybridSparseLinear(pack(w, mask, tiers, 15), path="reference")
    w2, mask2, tiers2 = random_hybrid(32, 64, seed=5, ratios=(0.2, 0.3, 0.5))
    b = HybridSparseLinear(pack(w2, mask2, tiers2, 15), path="reference")
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(a(x), b(x))
    sd = a.state_dict()
    sd["pack_format_version"] = torch.tensor(7, dtype=torch.int32)
    with pytest.raises(PackingError, match="format version 7"):
        b.load_state_dict(sd)


def test_bad_conversions():
    from hf_hybrid_sparse.errors import HybridSparseError

    with pytest.raises(HybridSparseError, match="no hybrid tier map"):
        HybridSparseLinear.from_linear(torch.nn.Linear(32, 32))
    w, mask, tiers = random_hybrid(32, 64)
    with pytest.raises(PackingError, match="does not divide"):
        pack(torch.zeros(30, 64), torch.ones(30, 64, dtype=torch.bool), tiers, 15)
    with pytest.raises(PackingError, match="2:4 NM blocks"):
        pack(w, mask, tiers, 15, nm=(4, 8))
    with pytest.raises(PackingError, match="more than 2 of 4"):
        pack(w, torch.ones_like(mask), tiers, 15)
    layer = HybridSparseLinear(pack(w, mask, tiers, 15), path="triton")
    with pytest.raises(HybridSparseError, match="Triton path needs CUDA"):
        layer(torch.randn(2, 64))


INTERPRETER_CHECK = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_kernels import random_hybrid
    from hf_hybrid_sparse.kernels.triton_decode import decode
    from hf_hybrid_sparse.kernels.packing import pack
    worst = 0.0
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)):
        for tokens, k in ((1, 15), (5, 15), (16, 7), (3, 0)):  # k=0: TOPK blocks keep nothing
            w, mask, tiers = random_hybrid(48, 80, dtype, seed=tokens, k=k)
            bias = torch.randn(48).to(dtype)
            x = torch.randn(tokens, 80).to(dtype)
            out = torch.full((tokens, 48), float("nan"), dtype=dtype)  # poisoned output buffer
            y = decode(x, pack(w, mask, tiers, k), bias, out=out)
            ref = (x.float() @ w.float().t() + bias.float())
            err = (y.float() - ref).abs().max().item()
            assert torch.isfinite(y).all(), "unwritten outputs"
            assert err <= tol * max(1.0, ref.abs().max().item()), (dtype, tokens, err)
            worst = max(worst, err)
    print("KERNEL_OK", worst)
    """
)


def test_triton_decode_kernel_under_the_interpreter():
    pytest.importorskip(
        "triton", reason="Triton is in the [dev] extra; .ci/run installs it, so CI runs this test"
    )
    env = subprocess_env(TRITON_INTERPRET="1")
    code = INTERPRETER_CHECK.format(tests=os.path.dirname(__file__))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "KERNEL_OK" in res.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("tokens", [1, 7, 16])
def test_triton_decode_on_gpu_real_shapes(shape, tokens):
    w, mask, tiers = random_hybrid(*shape, torch.float16, seed=tokens)
    packed = pack(w, mask, tiers, 15).to("cuda")
    from hf_hybrid_sparse.kernels.triton_decode import decode

    x = torch.randn(tokens, shape[1], device="cuda", dtype=torch.float16)
    out = torch.full((tokens, shape[0]), float("nan"), device="cuda", dtype=torch.float16)
    y = decode(x, packed, out=out)
    ref = x.float() @ w.cuda().float().t()
    assert torch.isfinite(y).all()
    assert torch.allclose(y.float(), ref, atol=5e-2, rtol=2e-2)


def test_use_kernels_loading_attribute(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_hybrid_sparse import sparsity_masks, tier_maps

    model = tiny_model("llama")
    apply_hybrid_sparsity(model, HybridSparseConfig(nsamples=4, seqlen=32), random_tokens(4, 32))
    model.save_pretrained(tmp_path / "m")
    probe = random_tokens(1, 10, seed=2)
    with torch.no_grad():
        ref = model(input_ids=probe).logits
    fast = AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", quantization_config=HybridSparseConfig(use_kernels=True)
    )
    assert isinstance(fast.model.layers[1].mlp.down_proj, HybridSparseLinear)
    with torch.no_grad():
        assert torch.allclose(fast(input_ids=probe).logits, ref, atol=1e-5)
    # a converted model saves in the normal layout: it reloads as plain layers with the same state
    fast.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert isinstance(again.model.layers[1].mlp.down_proj, torch.nn.Linear)
    for k, v in sparsity_masks(model).items():
        assert torch.equal(sparsity_masks(again)[k], v), k
    for k, v in tier_maps(model).items():
        assert torch.equal(tier_maps(again)[k], v), k
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    convert_to_dense(fast)
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in model.state_dict().items())
