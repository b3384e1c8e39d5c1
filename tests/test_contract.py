"""The sparsity contract (issue #11): any training loop, any LoRA route, every save and load, every failure.

Each test is one case of the issue's list: it asserts either the kept sparsity or the clear error.
"""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from procs import subprocess_env
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import VOCAB, pruned_tiny, random_tokens, tiny_model
from transformers import AutoModelForCausalLM

from hf_hybrid_sparse import (
    CalibrationError,
    ConfigError,
    HybridSparseConfig,
    ModelStructureError,
    PruningError,
    SparsityError,
    StorageError,
    apply_hybrid_sparsity,
    apply_masks,
    get_state,
    revived_weights,
    save_pretrained,
    sparsity_masks,
    tier_maps,
)
from hf_hybrid_sparse.checkpoint.saving import PENDING_FILE, recover


def _data(n=16, seqlen=32):
    ids = random_tokens(n, seqlen, seed=1)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _assert_sparse_and_trained(model, masks, before):
    params = dict(model.named_parameters())
    assert masks
    for name, mask in masks.items():
        p = params[name].detach()
        assert (p[~mask] == 0).all(), f"{name}: a pruned weight came back"
        assert not torch.equal(p[mask], before[name][mask]), f"{name}: kept weights did not train"


def _snapshot(model):
    return {k: v.clone() for k, v in sparsity_masks(model).items()}, {
        k: v.detach().clone() for k, v in model.named_parameters()
    }


def _train(model, opt, steps, seed, clip=False):
    """A hand-written loop: forward, backward, (clip), step, zero_grad."""
    ids = random_tokens(4, 32, seed=seed)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()


# -- any training loop -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.AdamW(ps, lr=5e-3, weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=5e-3, weight_decay=0.1),  # coupled L2
        lambda ps: torch.optim.SGD(ps, lr=5e-2, momentum=0.9, weight_decay=0.1),
    ],
    ids=["adamw", "adam-l2", "sgd-momentum"],
)
def test_hand_written_loop_keeps_sparsity(make_optimizer):
    model = pruned_tiny("llama")
    masks, before = _snapshot(model)
    _train(model, make_optimizer(model.parameters()), steps=4, seed=2, clip=True)
    _assert_sparse_and_trained(model, masks, before)
    assert revived_weights(model) == {}


def test_adafactor_keeps_sparsity():
    from transformers.optimization import Adafactor

    model = pruned_tiny("llama")
    masks, before = _snapshot(model)
    opt = Adafactor(model.parameters(), lr=1e-2, relative_step=False, scale_parameter=False, weight_decay=0.1)
    _train(model, opt, steps=4, seed=2)
    _assert_sparse_and_trained(model, masks, before)


def test_a_deep_copy_and_a_reloaded_model_keep_enforcing(tmp_path):
    model = pruned_tiny("llama")
    model.save_pretrained(tmp_path / "m")
    for m in (copy.deepcopy(model), AutoModelForCausalLM.from_pretrained(tmp_path / "m")):
        masks, before = _snapshot(m)
        _train(m, torch.optim.AdamW(m.parameters(), lr=5e-3, weight_decay=0.1), steps=3, seed=3)
        _assert_sparse_and_trained(m, masks, before)


def test_trl_sft_trainer_full_and_peft_keep_sparsity(tmp_path, smollm2):
    trl = pytest.importorskip(
        "trl", reason="TRL is in the [dev] extra; .ci/run installs it, so CI runs this test"
    )
    tok = smollm2[1]  # the tiny models' ids (< 128) are valid ids of this tokenizer too
    model = pruned_tiny("llama")
    masks, before = _snapshot(model)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        weight_decay=0.1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trl.SFTTrainer(model=model, args=args, train_dataset=_data(), processing_class=tok).train()
    _assert_sparse_and_trained(model, masks, before)

    peft_base = pruned_tiny("llama")
    masks, before = _snapshot(peft_base)
    trainer = trl.SFTTrainer(
        model=peft_base,
        args=args,
        train_dataset=_data(),
        processing_class=tok,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "up_proj"], lora_alpha=8),
    )
    trainer.train()
    merged = trainer.model.merge_and_unload()
    params = dict(merged.named_parameters())
    assert revived_weights(merged) == {}
    assert any(not torch.equal(params[k][m], before[k][m]) for k, m in masks.items()), "LoRA changed nothing"


# -- any LoRA route --------------------------------------------------------------------------


def test_plain_get_peft_model_and_merge_and_unload_keep_sparsity():
    model = pruned_tiny("llama", pattern="unstructured")
    masks = {k: v.clone() for k, v in sparsity_masks(model).items()}
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.lora_variant["default"]).__name__ == "MaskedLoraVariant"
    merged = peft_model.merge_and_unload()
    params = dict(merged.named_parameters())
    assert revived_weights(merged) == {}
    assert not torch.equal(
        params["model.layers.0.self_attn.q_proj.weight"] != 0,
        torch.ones_like(masks["model.layers.0.self_attn.q_proj.weight"]),
    )
    for name, mask in masks.items():
        assert torch.equal(sparsity_masks(merged)[name], mask)


def test_remask_route_merges_sparsely_through_plain_peft_calls(caplog):
    from hf_hybrid_sparse.training.lora import lora_mode

    model = pruned_tiny("llama")
    with lora_mode("remask"):
        peft_model = get_peft_model(
            model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
        )
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.lora_variant["default"]).__name__ == "RemaskLoraVariant"
    with caplog.at_level("INFO", logger="hf_hybrid_sparse"):
        merged = peft_model.merge_and_unload()
    assert revived_weights(merged) == {}
    assert "re-masking a LoRA merge removed" in caplog.text


def test_dora_on_a_pruned_layer_is_refused_naming_it():
    with pytest.raises(SparsityError, match="on a pruned Linear: merging it would revive pruned weights"):
        get_peft_model(pruned_tiny("llama"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))


def test_lora_on_unpruned_layers_is_untouched():
    model = tiny_model("llama")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    assert dict(peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_variant) == {}


# -- saves -----------------------------------------------------------------------------------


def test_save_refuses_revived_weights_and_writes_nothing(tmp_path, checks):
    model = pruned_tiny("llama")
    model.save_pretrained(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    w = model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        w[~get_state(model.model.layers[1].mlp.down_proj)["weight"].mask] = 0.25
    with pytest.raises(
        StorageError, match=r"model\.layers\.1\.mlp\.down_proj\.weight \(\d+\).*apply_masks\(model\)"
    ):
        model.save_pretrained(tmp_path / "m")
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert apply_masks(model) > 0 and revived_weights(model) == {}
    model.save_pretrained(tmp_path / "m")


def test_user_files_survive_a_failed_save(tmp_path, monkeypatch):
    import hf_hybrid_sparse.checkpoint.saving as saving

    model = pruned_tiny("llama")
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    (target / "optimizer.pt").write_bytes(b"adam state")
    (target / "runs").mkdir()
    (target / "runs" / "events").write_text("log")

    def broken_exchange(a, b):
        raise OSError(5, "simulated I/O error")

    monkeypatch.setattr(saving, "_exchange", broken_exchange)
    with pytest.raises(OSError, match="simulated"):
        model.save_pretrained(target)
    assert (target / "optimizer.pt").read_bytes() == b"adam state"
    assert (target / "runs" / "events").read_text() == "log"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    AutoModelForCausalLM.from_pretrained(target)


def test_mount_point_commits_in_place_and_an_interrupted_commit_is_recovered(tmp_path, monkeypatch):
    import hf_hybrid_sparse.checkpoint.saving as saving

    target = tmp_path / "volume"
    old = pruned_tiny("llama")
    old.save_pretrained(target)
    (target / "optimizer.pt").write_bytes(b"state")
    monkeypatch.setattr(saving.os.path, "ismount", lambda p: os.fspath(p) == os.fspath(target))
    monkeypatch.setattr(saving, "_exchange", lambda a, b: pytest.fail("a mount point cannot be swapped"))
    new = pruned_tiny("llama", pattern="2:4")
    real_recover = saving.recover

    def die_mid_commit(folder):  # the journal is written, the files not moved yet: a kill here
        raise KeyboardInterrupt

    monkeypatch.setattr(saving, "recover", die_mid_commit)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(new, target)
    assert (target / PENDING_FILE).exists()
    with pytest.raises(StorageError, match="interrupted save"):
        AutoModelForCausalLM.from_pretrained(target)
    monkeypatch.setattr(saving, "recover", real_recover)
    assert recover(target) and not (target / PENDING_FILE).exists()
    loaded = AutoModelForCausalLM.from_pretrained(target)
    assert all(torch.equal(sparsity_masks(new)[k], v) for k, v in sparsity_masks(loaded).items())
    assert (target / "optimizer.pt").read_bytes() == b"state"
    assert not [p for p in target.iterdir() if "hf-hybrid-sparse" in p.name]


def test_leftovers_of_dead_saves_are_cleaned_and_live_ones_kept(tmp_path):
    from hf_hybrid_sparse.checkpoint.saving import _owner_tag

    host = _owner_tag().rsplit("-", 1)[0]
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".m.hf-hybrid-sparse-tmp-{host}-{dead_pid}-abc123"
    live = tmp_path / f".m.hf-hybrid-sparse-tmp-{host}-{os.getppid()}-def456"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    pruned_tiny("llama").save_pretrained(tmp_path / "m")
    assert not stale.exists() and live.exists()


KILL_SCRIPT = textwrap.dedent(
    """
    import os, shutil, signal, sys
    sys.path.insert(0, {tests!r})
    import hf_hybrid_sparse.checkpoint.saving as saving
    from tiny_models import pruned_tiny
    model = pruned_tiny("llama", pattern="2:4")
    count = [0]
    def counting(fn):
        def wrapped(*a, **k):
            count[0] += 1
            if count[0] == {kill_at}:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)
        return wrapped
    saving.os.replace = counting(os.replace)
    saving.os.rename = counting(os.rename)
    saving.os.link = counting(os.link)
    saving._exchange = counting(saving._exchange)
    shutil.rmtree = counting(shutil.rmtree)
    model.save_pretrained({target!r}, max_shard_size="60KB")
    print("COUNT", count[0])
    """
)


def test_a_save_killed_at_any_moment_leaves_the_old_or_the_new_checkpoint(tmp_path):
    old = pruned_tiny("llama")
    target = tmp_path / "ckpt"
    old.save_pretrained(target)
    (target / "optimizer.pt").write_bytes(b"adam")
    old_masks = sparsity_masks(old)
    new_masks = sparsity_masks(pruned_tiny("llama", pattern="2:4"))

    def run(kill_at):
        script = KILL_SCRIPT.format(tests=os.path.dirname(__file__), kill_at=kill_at, target=str(target))
        return subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env(), timeout=300
        )

    full = run(10**6)  # no kill: how many file operations a save makes
    assert full.returncode == 0, full.stderr[-2000:]
    n_ops = int(full.stdout.split("COUNT")[1])
    assert n_ops >= 3
    seen = set()
    for kill_at in range(1, n_ops + 1):
        old.save_pretrained(target)  # start each round from the old checkpoint
        res = run(kill_at)
        assert res.returncode == -9, (kill_at, res.stderr[-1500:])
        loaded = AutoModelForCausalLM.from_pretrained(target)
        got = sparsity_masks(loaded)
        which = "new" if all(torch.equal(got[k], new_masks[k]) for k in got) else "old"
        if which == "old":
            assert all(torch.equal(got[k], old_masks[k]) for k in got), kill_at
        seen.add(which)
        assert (target / "optimizer.pt").read_bytes() == b"adam", kill_at
    assert seen == {"old", "new"}  # the kills landed before and after the switch


# -- loads -----------------------------------------------------------------------------------


def _doc(path):
    with safe_open(str(path), "pt") as fh:
        return json.loads(fh.metadata()["hybrid_sparse"])


def _rewrite(path, doc):
    with safe_open(str(path), "pt") as fh:
        data = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        meta = dict(fh.metadata())
    meta["hybrid_sparse"] = json.dumps(doc)
    save_file(data, str(path), metadata=meta)


@pytest.fixture
def saved(tmp_path):
    pruned_tiny("llama").save_pretrained(tmp_path / "m")
    return tmp_path / "m"


Q = "model.layers.0.self_attn.q_proj.weight"


def _relabel_topk_as_nm(doc):
    from hf_hybrid_sparse.checkpoint.format import decode_tier_map, encode_tier_map

    entry = doc["modules"][Q]
    tiers = decode_tier_map(entry["tier_map"], Q)
    tiers[tiers == 2] = 1
    entry["tier_map"] = encode_tier_map(tiers)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d: d["modules"].pop(Q),
            r"model\.layers\.0\.self_attn\.q_proj\.weight: the checkpoint holds the mask",
        ),
        (
            lambda d: d["modules"].clear(),
            r"model\.layers\.0\.self_attn\.q_proj\.weight.*metadata has no entry",
        ),
        (
            lambda d: d["modules"][Q].update(tier_map=None),
            r"q_proj\.weight: its metadata entry does not match",
        ),
        (_relabel_topk_as_nm, r"q_proj\.weight: its metadata entry does not match"),
        (
            lambda d: d["modules"][Q].update(topk_per_block=40),
            r"q_proj\.weight: its metadata entry does not match",
        ),
        (lambda d: d["modules"][Q].update(nm="3:4"), r"q_proj\.weight: its metadata entry does not match"),
        (lambda d: d["recipe"].update(method="sparsegpt"), "recipe or list of modules was edited"),
    ],
    ids=[
        "entry-deleted",
        "modules-emptied",
        "tier-map-null",
        "topk-as-nm",
        "topk-loosened",
        "nm-loosened",
        "recipe",
    ],
)
def test_edited_headers_are_refused_naming_the_module(saved, edit, message):
    doc = _doc(saved / "model.safetensors")
    edit(doc)
    _rewrite(saved / "model.safetensors", doc)
    with pytest.raises(StorageError, match=message):
        AutoModelForCausalLM.from_pretrained(saved)


def test_an_edit_in_a_later_shard_is_refused(tmp_path):
    pruned_tiny("llama").save_pretrained(tmp_path / "m", max_shard_size="40KB")
    shards = sorted((tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 2
    doc = _doc(shards[-1])
    doc["modules"]["model.layers.1.mlp.up_proj.weight"]["topk_per_block"] = 30
    _rewrite(shards[-1], doc)
    with pytest.raises(
        StorageError, match=rf"{shards[-1].name}: .* differs .* in model\.layers\.1\.mlp\.up_proj\.weight"
    ):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def test_compressed_checkpoint_fails_loudly_without_the_package(tmp_path):
    model = pruned_tiny("llama")
    save_pretrained(model, tmp_path / "c", compressed=True)
    script = textwrap.dedent(
        f"""
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(tmp_path / "c")!r})
        except Exception as exc:
            assert "hf_hybrid_sparse" not in sys.modules
            print("REFUSED", type(exc).__name__, str(exc)[:300].replace("\\n", " "))
        else:
            print("LOADED")
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=subprocess_env()
    )
    assert res.stdout.startswith("REFUSED"), res.stdout + res.stderr[-2000:]
    assert "size mismatch" in res.stdout or "mismatch" in res.stdout


# -- a transformers quantizer ----------------------------------------------------------------


def test_dequantize_returns_a_plain_model(saved):
    model = AutoModelForCausalLM.from_pretrained(saved)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    plain = model.dequantize()
    assert not list(sparsity_masks(plain)) and getattr(plain, "hf_quantizer", None) is None
    assert not hasattr(plain.config, "quantization_config")
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in weights.items())
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    ids = random_tokens(2, 16)
    plain(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert (plain.model.layers[0].self_attn.q_proj.weight != 0).all()  # nothing enforces masks any more


def test_dtype_casts_behave_the_same_before_and_after_a_reload(saved):
    fresh = pruned_tiny("llama")
    loaded = AutoModelForCausalLM.from_pretrained(saved)
    for model in (fresh, loaded):
        assert not getattr(model, "is_quantized", False) and not hasattr(model.config, "_is_quantized")
        model.half()
        assert model.dtype == torch.float16 and revived_weights(model) == {}
        model.float()
        assert model.dtype == torch.float32


def test_magnitude_prunes_on_load_and_calibrated_methods_are_refused(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    config = HybridSparseConfig(method="magnitude", pattern="hybrid")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=config)
    ref = tiny_model("llama")
    apply_hybrid_sparsity(ref, config)
    assert tier_maps(model).keys() == tier_maps(ref).keys() and tier_maps(model)
    assert all(torch.equal(tier_maps(model)[k], tier_maps(ref)[k]) for k in tier_maps(ref))
    model.save_pretrained(tmp_path / "pruned")
    assert (
        sparsity_masks(AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")).keys()
        == sparsity_masks(ref).keys()
    )
    with pytest.raises(ConfigError, match="needs calibration.*apply_hybrid_sparsity"):
        AutoModelForCausalLM.from_pretrained(
            tmp_path / "dense", quantization_config=HybridSparseConfig(method="wanda")
        )


# -- failures leave a declared state ---------------------------------------------------------


def test_a_nan_weight_is_refused_before_any_weight_changes():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelStructureError, match=r"model\.layers\.1\.mlp\.up_proj holds non-finite"):
        apply_hybrid_sparsity(
            model, HybridSparseConfig(method="sparsegpt", nsamples=2, seqlen=32), random_tokens(2, 32)
        )
    after = model.state_dict()
    assert all(torch.equal(after[k], v) or torch.isnan(v).any() for k, v in before.items())
    assert not list(sparsity_masks(model))


def test_a_failing_block_is_left_whole_and_earlier_blocks_keep_a_consistent_state(tmp_path, monkeypatch):
    import hf_hybrid_sparse.engine.sequential as engine

    real = engine.prune_matrix
    calls = {"n": 0}

    def flaky(weight, config, *a, **k):
        calls["n"] += 1
        if calls["n"] == 10:  # the 3rd linear of block 1
            raise RuntimeError("simulated failure")
        return real(weight, config, *a, **k)

    monkeypatch.setattr(engine, "prune_matrix", flaky)
    model = tiny_model("llama")
    block1 = {k: v.clone() for k, v in model.model.layers[1].state_dict().items()}
    with pytest.raises(
        PruningError, match=r"Blocks 0\.\.0 of 2 are pruned and carry their sparsity state; block 1"
    ):
        apply_hybrid_sparsity(model, HybridSparseConfig(nsamples=2, seqlen=32), random_tokens(2, 32))
    names = list(sparsity_masks(model))
    assert len(names) == 7 and all(n.startswith("model.layers.0.") for n in names)
    assert all(torch.equal(model.model.layers[1].state_dict()[k], v) for k, v in block1.items())
    model.save_pretrained(tmp_path / "partial")  # consistent: saves and reloads
    assert list(sparsity_masks(AutoModelForCausalLM.from_pretrained(tmp_path / "partial"))) == names


def test_repruning_2_4_as_hybrid_is_refused_and_unstructured_composes():
    model = pruned_tiny("llama", pattern="2:4")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelStructureError, match="already pruned with pattern '2:4'"):
        apply_hybrid_sparsity(model, HybridSparseConfig(method="magnitude", pattern="hybrid"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    old = {k: v.clone() for k, v in sparsity_masks(model).items()}
    apply_hybrid_sparsity(model, HybridSparseConfig(method="magnitude", pattern="unstructured", sparsity=0.7))
    for k, new in sparsity_masks(model).items():
        assert not (new & ~old[k]).any(), k  # old zeros stay zero
        assert ((~new).sum(dim=1) == int(0.7 * new.shape[1])).all(), k  # and the new rule holds per row


def test_topk_per_block_zero_works_end_to_end(tmp_path):
    from hf_hybrid_sparse import convert_to_hybrid_kernels

    model = pruned_tiny("llama", topk_per_block=0)
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    probe = random_tokens(1, 12, seed=5)
    with torch.no_grad():
        ref = loaded(input_ids=probe).logits
        convert_to_hybrid_kernels(loaded, path="reference")
        assert torch.allclose(loaded(input_ids=probe).logits, ref, atol=1e-5)


def test_meta_device_model_is_refused_clearly():
    config = tiny_model("llama").config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ModelStructureError, match=r"q_proj: the weight is on the meta device \(not loaded\)"):
        apply_hybrid_sparsity(model, HybridSparseConfig(method="magnitude"))


def test_skipping_every_layer_is_refused():
    with pytest.raises(ModelStructureError, match="nothing would be pruned"):
        apply_hybrid_sparsity(
            tiny_model("llama"), HybridSparseConfig(method="magnitude", block_size=48, indivisible="skip")
        )


# -- types and settings that prune nothing ---------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"block_size": "16"}, "block_size must be an integer"),
        ({"topk_per_block": 15.5}, "topk_per_block must be an integer"),
        ({"sparsity": "0.5"}, "sparsity must be a number"),
        ({"nsamples": True}, "nsamples must be an integer"),
        ({"tier_ratios": "0.35,0.45,0.20"}, "tier_ratios must be three numbers"),
        ({"pattern": "1:1"}, "keeps every weight"),
        ({"nm": "4:4"}, "keeps every weight of the NM blocks"),
        ({"topk_per_block": 256}, "keeps every weight of a TOPK block"),
        ({"ignore": 5}, "ignore must be None"),
    ],
)
def test_bad_types_and_do_nothing_settings_are_refused(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        HybridSparseConfig(**kwargs)


def test_integral_floats_are_coerced():
    cfg = HybridSparseConfig(block_size=16.0, nsamples=8.0, tier_ratios=[0.5, 0.5, 0])
    assert cfg.block_size == 16 and isinstance(cfg.block_size, int) and cfg.tier_ratios == (0.5, 0.5, 0.0)


@pytest.mark.parametrize(
    "tokens, words",
    [
        (torch.rand(2, 32), "integer tensor, got torch.float32"),
        (torch.ones(2, 32, dtype=torch.bool), "integer tensor, got torch.bool"),
        (torch.full((2, 32), VOCAB + 5), "vocabulary has 128 entries"),
    ],
)
def test_calibration_ids_are_not_cast_silently(tokens, words):
    model = tiny_model("llama")
    with pytest.raises(CalibrationError, match=words):
        apply_hybrid_sparsity(model, HybridSparseConfig(nsamples=2, seqlen=32), tokens)
    assert not list(sparsity_masks(model))


# -- the CLI checks before minutes of work ---------------------------------------------------


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--seqlen", "4096"], "exceeds the model's max_position_embeddings=512"),
        (["--calib", "no_such_corpus"], "Unknown calibration dataset 'no_such_corpus'"),
        (["--save", "FILE"], "exists and is not a directory"),
    ],
)
def test_prune_command_checks_before_loading_the_model(
    tiny_checkpoint, tmp_path, monkeypatch, capsys, extra, words
):
    import hf_hybrid_sparse.models as models
    from hf_hybrid_sparse.cli import main

    (tmp_path / "FILE").write_text("not a folder")
    extra = [str(tmp_path / "FILE") if e == "FILE" else e for e in extra]
    monkeypatch.setattr(models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["prune", "--model", str(tiny_checkpoint), "--skip_eval", *extra]) == 2
    assert words in capsys.readouterr().err
