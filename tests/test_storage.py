"""Save -> load keeps masks, tier maps and recipe; corrupted checkpoints are rejected; saves are atomic."""

import contextlib
import copy
import dataclasses
import hashlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from procs import subprocess_env
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import FAMILIES, pruned_tiny, random_tokens, tiny_model
from transformers import AutoModelForCausalLM

from hf_hybrid_sparse import (
    HybridSparseConfig,
    StorageError,
    apply_hybrid_sparsity,
    save_pretrained,
    sparsity_masks,
    tier_maps,
)
from hf_hybrid_sparse.bits import pack_bits, unpack_bits
from hf_hybrid_sparse.checkpoint.format import decode_tier_map, encode_tier_map, parse_metadata
from hf_hybrid_sparse.state import iter_sparse_params


def _assert_same_state(a, b):
    ma, mb = sparsity_masks(a), sparsity_masks(b)
    assert ma.keys() == mb.keys() and ma
    for k in ma:
        assert torch.equal(ma[k].cpu(), mb[k].cpu()), k
    ta, tb = tier_maps(a), tier_maps(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert (
        a.config.quantization_config.to_dict()
        == HybridSparseConfig.from_dict(b.config.quantization_config.to_dict()).to_dict()
    )


def test_pack_unpack_bits_round_trip():
    for shape in [(3, 5), (16, 16), (2, 7, 9), (1, 1)]:
        mask = torch.rand(shape) > 0.5
        assert torch.equal(unpack_bits(pack_bits(mask), shape), mask)
    t = torch.randint(0, 3, (5, 7), dtype=torch.int8)
    assert torch.equal(decode_tier_map(encode_tier_map(t), "x"), t)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_every_family(tmp_path, family):
    model = pruned_tiny(family)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    _assert_same_state(model, loaded)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_round_trip_sharded_and_other_patterns(tmp_path, pattern):
    model = pruned_tiny("qwen2", pattern=pattern, method="sparsegpt")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    _assert_same_state(model, loaded)
    # every shard header describes the whole model
    for shard in shards:
        with safe_open(str(tmp_path / shard), "pt") as fh:
            assert len(parse_metadata(fh.metadata()["hybrid_sparse"])["modules"]) == 14


def test_dtype_change_round_trip(tmp_path):
    model = pruned_tiny("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    _assert_same_state(model, loaded)
    loaded32 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert sparsity_masks(loaded32).keys() == sparsity_masks(model).keys()


def test_plain_transformers_loads_a_working_dense_model(tmp_path):
    model = pruned_tiny("llama")
    model.save_pretrained(tmp_path / "m")
    probe = random_tokens(1, 12, seed=9)
    with torch.no_grad():
        expected = model(input_ids=probe).logits
    torch.save({"probe": probe, "expected": expected}, tmp_path / "probe.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "m")!r})
        assert "hf_hybrid_sparse" not in sys.modules
        d = torch.load({str(tmp_path / "probe.pt")!r})
        with torch.no_grad():
            got = m(input_ids=d["probe"]).logits
        assert torch.allclose(got, d["expected"], atol=1e-5), (got - d["expected"]).abs().max()
        print("OK", float((m.model.layers[0].mlp.down_proj.weight == 0).float().mean()))
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=subprocess_env()
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("OK") and float(res.stdout.split()[1]) > 0.3


def _rewrite(path, tensors=None, metadata=None):
    with safe_open(str(path), "pt") as fh:
        data = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        meta = dict(fh.metadata())
    if tensors:
        data.update(tensors)
    if metadata:
        meta.update(metadata)
    save_file(data, str(path), metadata=meta)


def _doc(path):
    with safe_open(str(path), "pt") as fh:
        return json.loads(fh.metadata()["hybrid_sparse"])


def _digest(obj):
    """The documented digest: sha256 of the object without "digest", JSON with sorted keys, no spaces."""
    body = {k: v for k, v in obj.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _signed(doc):
    """``doc`` re-signed as a tool that keeps the digests would write it (so the semantic checks are reached)."""
    for entry in doc["modules"].values():
        if isinstance(entry, dict):
            entry["digest"] = _digest(entry)
    doc["digest"] = _digest(doc)
    return json.dumps(doc)


@pytest.fixture
def saved(tmp_path):
    model = pruned_tiny("llama")
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_truncated_file_is_rejected(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(Exception, match=r"(?i)safetensors|incomplete|truncat|invalid|header"):
        AutoModelForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(format_version=99), "format version 99 is not supported"),
        (
            lambda d: d["modules"]["model.layers.0.self_attn.q_proj.weight"].update(shape=[64, 32]),
            "tier map shape|shape",
        ),
        (
            lambda d: d["modules"]["model.layers.1.mlp.up_proj.weight"]["tier_map"].update(data="////" * 32),
            "out of range|holds",
        ),
        (
            lambda d: d["modules"].update(
                {"model.layers.9.mlp.up_proj.weight": d["modules"].pop("model.layers.1.mlp.up_proj.weight")}
            ),
            "does not have",
        ),
        (
            lambda d: d["modules"].update(
                {"model.layers.1.mlp.up_proj.weight": dict(d["modules"]["model.layers.0.mlp.up_proj.weight"])}
            ),
            "name the same mask tensor",
        ),
    ],
)
def test_edited_metadata_is_rejected_naming_the_problem(saved, edit, message):
    doc = _doc(saved / "model.safetensors")
    edit(doc)
    _rewrite(saved / "model.safetensors", metadata={"hybrid_sparse": _signed(doc)})
    with pytest.raises(StorageError, match=message):
        AutoModelForCausalLM.from_pretrained(saved)


def test_tier_code_out_of_range_is_rejected(saved):
    doc = _doc(saved / "model.safetensors")
    entry = doc["modules"]["model.layers.0.mlp.down_proj.weight"]
    codes = torch.full(tuple(entry["tier_map"]["shape"]), 3, dtype=torch.int8)
    entry["tier_map"] = encode_tier_map(codes)
    _rewrite(saved / "model.safetensors", metadata={"hybrid_sparse": _signed(doc)})
    with pytest.raises(
        StorageError, match=r"model\.layers\.0\.mlp\.down_proj\.weight: tier code 3 is out of range"
    ):
        AutoModelForCausalLM.from_pretrained(saved)


def test_mask_weight_disagreement_is_rejected(saved, checks):
    with safe_open(str(saved / "model.safetensors"), "pt") as fh:
        w = fh.get_tensor("model.layers.1.self_attn.o_proj.weight")
    w[w == 0] = 0.5
    _rewrite(saved / "model.safetensors", tensors={"model.layers.1.self_attn.o_proj.weight": w})
    with pytest.raises(
        StorageError,
        match=r"model\.layers\.1\.self_attn\.o_proj\.weight: \d+ weights that the mask prunes are not zero",
    ):
        AutoModelForCausalLM.from_pretrained(saved)


def test_missing_metadata_is_rejected(saved):
    with safe_open(str(saved / "model.safetensors"), "pt") as fh:
        data = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    save_file(data, str(saved / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StorageError, match="no 'hybrid_sparse' metadata"):
        AutoModelForCausalLM.from_pretrained(saved)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
            lambda children: (
                st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
            ),
            max_leaves=20,
        ).map(json.dumps),
    )
)
def test_fuzzed_metadata_only_raises_storage_error(text):
    with contextlib.suppress(StorageError):
        parse_metadata(text)


@settings(max_examples=200, deadline=None)
@given(
    field=st.sampled_from(
        ["shape", "transposed", "pattern", "block_size", "numel", "kept", "mask", "tier_map", "nm"]
    ),
    value=st.one_of(
        st.none(),
        st.integers(-5, 10**12),
        st.text(max_size=6),
        st.lists(st.integers(-3, 70), max_size=5),
        st.dictionaries(
            st.sampled_from(["shape", "data"]),
            st.one_of(st.text(max_size=8), st.lists(st.integers(-2, 9), max_size=3)),
        ),
    ),
)
def test_fuzzed_module_entries_only_raise_storage_error(field, value):
    good = {
        "shape": [32, 32],
        "transposed": False,
        "pattern": "hybrid",
        "method": "wanda",
        "block_size": 16,
        "nm": "2:4",
        "topk_per_block": 15,
        "numel": 1024,
        "kept": 500,
        "mask": "hybrid_sparse_mask.00000",
        "tier_map": encode_tier_map(torch.zeros(2, 2, dtype=torch.int8)),
    }
    assert parse_metadata(_signed({"format_version": 1, "recipe": {}, "modules": {"a.weight": dict(good)}}))
    good[field] = value
    # signed, so the fuzzed value reaches the field checks instead of stopping at the digest
    doc = _signed({"format_version": 1, "recipe": {}, "modules": {"a.weight": good}})
    with contextlib.suppress(StorageError):
        parse_metadata(doc)


def test_interrupted_save_leaves_old_folder_or_nothing(tmp_path, monkeypatch):
    model = pruned_tiny("llama")
    target = tmp_path / "out"
    real = type(model).save_pretrained

    def dying(self, directory, **kw):
        real(self, directory, **kw)
        with open(f"{directory}/model.safetensors", "r+b") as fh:  # half-written weights, then the kill
            fh.truncate(1000)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(type(model), "save_pretrained", dying)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(target)
    assert not target.exists() and not list(tmp_path.iterdir())
    monkeypatch.setattr(type(model), "save_pretrained", real)
    model.save_pretrained(target)
    (target / "optimizer.pt").write_text("trainer state")  # a file the save does not own
    before = (target / "model.safetensors").read_bytes()
    monkeypatch.setattr(type(model), "save_pretrained", dying)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, target)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.setattr(type(model), "save_pretrained", real)
    save_pretrained(model, target, max_shard_size="40KB")
    assert (target / "optimizer.pt").read_text() == "trainer state"
    assert not (target / "model.safetensors").exists()  # replaced by the sharded files
    _assert_same_state(model, AutoModelForCausalLM.from_pretrained(target))


def _bytes(path, keys):
    with safe_open(str(path), "pt") as fh:
        return sum(
            fh.get_slice(k).get_shape() and fh.get_tensor(k).numel() * fh.get_tensor(k).element_size()
            for k in keys
        )


@pytest.mark.parametrize(
    "family,dtype",
    [("llama", torch.float16), ("gpt2", torch.float16), ("opt", torch.float16), ("llama", torch.bfloat16)],
)
def test_compressed_layout_is_small_and_bit_exact(tmp_path, family, dtype):
    model = tiny_model(family).to(dtype)
    apply_hybrid_sparsity(model, HybridSparseConfig(method="magnitude", pattern="hybrid"))
    save_pretrained(model, tmp_path / "c", compressed=True)
    doc = _doc(tmp_path / "c" / "model.safetensors")
    stored = [e["values"] for e in doc["modules"].values()] + [e["mask"] for e in doc["modules"].values()]
    dense_bytes = sum(e["numel"] * 2 for e in doc["modules"].values())
    ratio = _bytes(tmp_path / "c" / "model.safetensors", stored) / dense_bytes
    assert ratio <= 0.65, ratio  # values + bit masks of the pruned layers vs their dense fp16 bytes
    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as fh:
        for key, entry in doc["modules"].items():  # no dense copy of a pruned weight: its kept values only
            assert entry["values"] == key and fh.get_slice(key).get_shape() == [entry["kept"]]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=dtype)
    _assert_same_state(model, loaded)


def test_compressed_refuses_fused_experts(tmp_path):
    model = pruned_tiny("mixtral")
    with pytest.raises(StorageError, match="fused MoE expert"):
        save_pretrained(model, tmp_path / "c", compressed=True)
    assert not (tmp_path / "c").exists()


def test_compressed_values_count_is_checked(tmp_path):
    model = pruned_tiny("llama", method="magnitude")
    save_pretrained(model, tmp_path / "c", compressed=True)
    f = tmp_path / "c" / "model.safetensors"
    doc = _doc(f)
    key = doc["modules"]["model.layers.0.mlp.up_proj.weight"]["values"]
    with safe_open(str(f), "pt") as fh:
        short = fh.get_tensor(key)[:-3]
    _rewrite(f, tensors={key: short})
    with pytest.raises(StorageError, match=r"up_proj\.weight: \d+ stored values for \d+ kept weights"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nonzero_bits_by_hand(dtype):
    from hf_hybrid_sparse.hostops import nonzero_bits

    # -0.0 is a pruned zero; NaN and the smallest subnormal are values a mask must keep
    w = torch.tensor([[0.0, -0.0, 1.0, float("nan"), 0.0, 0.0, -2.0, 0.0, 0.0, 1e-45]]).to(dtype)
    subnormal_kept = w[0, 9].item() != 0  # fp16 / bf16 round 1e-45 to zero
    # entries 2, 3 and 6 are non-zero: bits 2, 3, 6 of the first byte (LSB first); entry 9 is bit 1 of the next
    assert nonzero_bits(w).tolist() == [0b01001100, int(subnormal_kept) << 1]


_OUTCOMES: set[bool] = set()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["dense", "topk", "nm"]))
def test_byte_tier_check_agrees_with_check_hybrid(seed, broken):
    """The loader's byte-counting checks, NumPy's and the extension's, reject exactly what ``check_hybrid``
    rejects (16x16, 2:4)."""
    from hf_hybrid_sparse import native
    from hf_hybrid_sparse.checkpoint.reader import _raise_tier_faults, _tier_faults_bytes, native_counts
    from hf_hybrid_sparse.pruning.patterns import DENSE, NM, TOPK, check_hybrid, expand_tiers

    g = torch.Generator().manual_seed(seed)
    tiers = torch.randint(0, 3, (2, 3), generator=g, dtype=torch.int8)
    per = expand_tiers(tiers, 16)
    scores = torch.rand(32, 48, generator=g)
    nm_keep = scores.reshape(32, 12, 4).argsort(-1, descending=True).argsort(-1) < 2
    mask = torch.where(per == DENSE, True, nm_keep.reshape(32, 48))
    blocks = scores.reshape(2, 16, 3, 16).permute(0, 2, 1, 3).reshape(6, 256)
    top = torch.zeros(6, 256, dtype=torch.bool).scatter_(1, blocks.topk(5, dim=1).indices, True)
    top = top.reshape(2, 3, 16, 16).permute(0, 2, 1, 3).reshape(32, 48)
    mask = torch.where(per == TOPK, top, mask)
    r, c = int(torch.randint(0, 32, (1,), generator=g)), int(torch.randint(0, 48, (1,), generator=g))
    code = {"dense": DENSE, "topk": TOPK, "nm": NM}[broken]
    if (per == code).any():  # flip one weight of a block of that tier: keep it (nm/topk) or prune it (dense)
        rows, cols = torch.nonzero(per == code, as_tuple=True)
        r, c = int(rows[r % len(rows)]), int(cols[c % len(cols)])
        mask[r, c] = code != DENSE
    entry = {"shape": [32, 48], "tier_map": tiers, "topk_per_block": 5}
    problems = check_hybrid(mask, tiers, 16, 2, 4, 5)
    bits = pack_bits(mask).numpy()
    _OUTCOMES.add(bool(problems))
    assert native.load(), "the extension must build here (g++ is on this machine and in CI)"
    faults = _tier_faults_bytes(bits, entry)
    assert native_counts(entry, None, bits, True) == [int(mask.sum()), 0, *faults]
    if problems:
        with pytest.raises(StorageError, match="does not obey its tier map"):
            _raise_tier_faults("k", entry, *faults)
    else:
        assert faults == (0, 0, 0)


@pytest.mark.parametrize("tiered", [True, False])
def test_kept_count_disagreeing_with_the_metadata_is_refused(tiered, checks):
    """The kept count comes from the tier rules' block counts (tiered) or a popcount: either catches a
    header whose ``kept`` is off by one, and a weight the mask prunes that is not zero."""
    from hf_hybrid_sparse.checkpoint.reader import verified_state
    from hf_hybrid_sparse.pruning.patterns import NM, TOPK

    tiers = torch.tensor([[NM, TOPK], [TOPK, NM]], dtype=torch.int8)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[:16, 0:16:2] = mask[16:, 16::4] = True  # NM blocks keep 2 of 4, TOPK blocks keep nothing
    weight = torch.randn(32, 32) * mask
    entry = {
        "shape": (32, 32), "transposed": False, "pattern": "hybrid" if tiered else "unstructured",
        "method": "wanda", "block_size": 16, "nm": "2:4", "topk_per_block": 15,
        "tier_map": tiers if tiered else None, "kept": int(mask.sum()),
    }  # fmt: skip
    bits = pack_bits(mask).numpy()
    assert verified_state("k", entry, mask, weight, bits).mask.equal(mask)
    with pytest.raises(StorageError, match=f"keeps {int(mask.sum())} weights, the metadata says"):
        verified_state("k", entry | {"kept": int(mask.sum()) + 1}, mask, weight, bits)
    weight[20, 1] = 1e-30  # pruned position (TOPK block keeping nothing / unstructured zero)
    with pytest.raises(StorageError, match="1 weights that the mask prunes are not zero"):
        verified_state("k", entry, mask, weight, bits)


def test_native_mask_checks_agree_with_the_numpy_path():
    """The extension's one-pass check (``csrc/mask_checks.cpp``) counts what the NumPy path counts: kept
    weights, pruned weights that are not zero (-0.0 is zero, NaN is not) and tier faults, for every dtype,
    odd shapes (a partial last byte) and the weight left out (offloaded)."""
    import itertools

    from hf_hybrid_sparse import hostops, native
    from hf_hybrid_sparse.checkpoint import reader

    assert native.load(), "the extension must build here (g++ is on this machine and in CI)"
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 32), (48, 80), (7, 13), (3, 5, 16)]
    for shape, dtype, trial in itertools.product(
        shapes, (torch.float32, torch.bfloat16, torch.float16), range(8)
    ):
        tiled = len(shape) == 2 and shape[0] % 16 == 0 and shape[1] % 16 == 0 and trial % 2 == 0
        mask = torch.rand(shape, generator=g) < (0.05 + 0.9 * trial / 8)
        weight = (torch.randn(shape, generator=g) * mask).to(
            dtype
        )  # pruned entries of negative draws are -0.0
        if trial % 3 == 0:  # revived weights, in any position
            weight[torch.rand(shape, generator=g) < 0.02] = 1.0
        if trial % 4 == 2:
            weight.view(-1)[-1] = float("nan")
        tiers = (
            torch.randint(0, 3, (shape[0] // 16, shape[1] // 16), generator=g, dtype=torch.int8)
            if tiled
            else None
        )
        entry = {"shape": shape, "tier_map": tiers, "topk_per_block": trial * 5}
        bits = pack_bits(mask).numpy()
        for w in (weight, None):
            revived = 0 if w is None else int(hostops.popcount(hostops.nonzero_bits(w) & ~bits).sum())
            faults = reader._tier_faults_bytes(bits, entry) if tiled else (0, 0, 0)
            expected = [int(mask.sum()), revived, *faults]
            assert reader.native_counts(entry, w, bits, tiled) == expected, (shape, dtype, trial)
    # by hand: one of each fault in a 16x48 weight of tiers DENSE | NM | TOPK (top-1)
    from hf_hybrid_sparse.pruning.patterns import DENSE, NM, TOPK

    mask = torch.zeros(16, 48, dtype=torch.bool)
    mask[:, :16] = True
    mask[:, 16:32:2] = True
    mask[0, 32] = True
    mask[0, 1] = False  # DENSE block missing a weight
    mask[3, 17] = True  # NM group of 4 keeping 3
    mask[5, 40] = True  # TOPK block keeping 2 > 1
    weight = torch.randn(16, 48) * mask
    weight[9, 47] = -0.0
    weight[10, 46] = float("nan")  # pruned and not zero
    entry = {
        "shape": (16, 48),
        "tier_map": torch.tensor([[DENSE, NM, TOPK]], dtype=torch.int8),
        "topk_per_block": 1,
    }
    bits = pack_bits(mask).numpy()
    assert reader.native_counts(entry, weight, bits, True) == [int(mask.sum()), 1, 1, 1, 1]
    assert reader._tier_faults_bytes(bits, entry) == (1, 1, 1)
    assert int(hostops.popcount(hostops.nonzero_bits(weight) & ~bits).sum()) == 1


def test_loading_without_a_built_extension_checks_in_numpy_and_builds_nothing(tmp_path):
    """A first load on a machine without the extension's build does not compile it (a minute, for checks
    of a fraction of a second): ``native.ready()`` is False and the NumPy checks run."""
    model = pruned_tiny("llama", pattern="hybrid")
    save_pretrained(model, tmp_path / "m")
    script = textwrap.dedent(
        f"""
        import hf_hybrid_sparse
        from hf_hybrid_sparse import native
        from hf_hybrid_sparse.checkpoint import reader
        from transformers import AutoModelForCausalLM
        used = []
        original = reader.native_counts
        reader.native_counts = lambda *a: used.append(original(*a)) or used[-1]
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "m")!r})
        assert used and all(u is None for u in used), used
        print("READY", native.ready(), len(hf_hybrid_sparse.sparsity_masks(m)))
        """
    )
    env = subprocess_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "READY False" in res.stdout
    assert not any((tmp_path / "ext").rglob("*.so"))


def test_loading_uses_the_built_extension_for_the_checks(tmp_path, monkeypatch):
    from hf_hybrid_sparse import native
    from hf_hybrid_sparse.checkpoint import reader

    assert native.load() and native.ready()
    model = pruned_tiny("llama", pattern="hybrid")
    save_pretrained(model, tmp_path / "m")
    used = []
    original = reader.native_counts
    monkeypatch.setattr(reader, "native_counts", lambda *a: used.append(original(*a)) or used[-1])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert len(used) == len(sparsity_masks(model)) and all(u is not None and u[1] == 0 for u in used)
    _assert_same_state(model, loaded)


def test_two_bit_codes_unpack_by_shifting_for_every_byte_and_round_trip():
    from hf_hybrid_sparse.bits import pack_2bit, unpack_2bit, unpack_2bit_bytes

    every = torch.arange(256, dtype=torch.uint8)
    expected = torch.stack([(every >> s) & 3 for s in (0, 2, 4, 6)], dim=-1).reshape(-1)
    assert torch.equal(unpack_2bit(every, 1024), expected)
    assert torch.equal(torch.from_numpy(unpack_2bit_bytes(every.numpy().tobytes(), 1023)), expected[:1023])
    codes = torch.randint(0, 4, (3, 7), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(unpack_2bit(pack_2bit(codes), 7), codes)
    assert torch.equal(
        torch.from_numpy(unpack_2bit_bytes(pack_2bit(codes[0]).numpy().tobytes(), 7)), codes[0]
    )
    assert unpack_2bit(torch.zeros(0, dtype=torch.uint8), 0).shape == (0,)
    assert unpack_2bit_bytes(b"", 0).shape == (0,)


def test_two_of_four_bit_trick_is_exact_on_every_segment():
    """The bit-parallel 2:4 test agrees with counting each 4-bit group, for all 65536 16-bit segments."""
    from hf_hybrid_sparse.checkpoint.reader import _over_2_of_4

    values = np.arange(65536, dtype=np.uint16)
    groups = [(values >> shift) & 15 for shift in (0, 4, 8, 12)]
    naive = np.zeros(65536, dtype=bool)
    for g in groups:
        naive |= np.array([bin(int(v)).count("1") > 2 for v in g])
    assert (_over_2_of_4(values).astype(bool) == naive).all()
    assert naive.sum() == 65536 - 11**4  # 11 of the 16 values of a group keep at most 2


def test_popcount_fallback_counts_wide_elements(monkeypatch):
    from hf_hybrid_sparse import hostops

    values = np.array([[0, 1, 0xFFFF], [0x8001, 0x00F0, 0x1234]], dtype=np.uint16)
    expected = np.array([[0, 1, 16], [2, 4, 5]])
    assert (hostops.popcount(values) == expected).all()
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # NumPy < 2 has no bitwise_count
    assert (hostops.popcount(values) == expected).all()


def test_byte_tier_check_saw_both_outcomes():
    # the property above is only a test if some of its masks broke the rules and some did not
    if not _OUTCOMES:
        test_byte_tier_check_agrees_with_check_hybrid()
    assert len(_OUTCOMES) == 2, _OUTCOMES


def test_loaded_masks_stay_packed_until_first_read(tmp_path):
    model = pruned_tiny("llama")
    save_pretrained(model, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    states = [s for _, _, _, s in iter_sparse_params(loaded)]
    assert states and all("mask" not in s.__dict__ for s in states)
    with torch.no_grad():
        loaded(torch.tensor([[1, 2, 3]]))
    assert all("mask" not in s.__dict__ for s in states)  # inference reads no mask
    copied = copy.deepcopy(loaded)
    _assert_same_state(model, loaded)  # reads every mask: unpacked once, equal to the saved ones
    assert all("mask" in s.__dict__ and "_packed" not in s.__dict__ for s in states)
    _assert_same_state(model, copied)  # a copy made while packed unpacks on its own


def test_saving_a_loaded_model_writes_its_packed_masks_without_unpacking(tmp_path):
    model = pruned_tiny("llama")
    save_pretrained(model, tmp_path / "a")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    states = [s for _, _, _, s in iter_sparse_params(loaded)]
    save_pretrained(loaded, tmp_path / "b")
    assert states and all("mask" not in s.__dict__ for s in states)  # the save read the bits as stored
    with (
        safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as a,
        safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as b,
    ):
        names = sorted(a.keys())
        assert names == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in names)
    _assert_same_state(model, AutoModelForCausalLM.from_pretrained(tmp_path / "b"))


def test_states_compare_by_value_packed_or_not(tmp_path):
    # a loaded state (mask still bit-packed) equals the saved one; one flipped mask entry or another recipe
    # field makes them differ (the generated dataclass __eq__ raised on any mask of more than one entry)
    model = pruned_tiny("llama")
    save_pretrained(model, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    saved = {n: s for n, _, _, s in iter_sparse_params(model)}
    for name, _, _, state in iter_sparse_params(loaded):
        assert "mask" not in state.__dict__
        assert state == saved[name] and saved[name] == state
    name, state = next(iter(saved.items()))
    flipped = copy.copy(state)
    flipped.mask = state.mask.clone()
    flipped.mask.view(-1)[0] ^= True
    assert flipped != state
    assert dataclasses.replace(state, topk_per_block=state.topk_per_block + 1) != state
    assert state != "not a state"
    with pytest.raises(TypeError):
        hash(state)
