"""Masks hold through training (full fine-tuning, LoRA) and merging keeps the sparsity."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from procs import subprocess_env
from tiny_models import pruned_tiny, random_tokens, tiny_model
from transformers import Trainer, TrainingArguments

from hf_hybrid_sparse import (
    HybridSparseConfig,
    SparseTrainer,
    SparsityError,
    SparsityMaskCallback,
    apply_hybrid_sparsity,
    get_sparse_peft_model,
    merge_sparse_lora,
    sparsity_masks,
)
from hf_hybrid_sparse.errors import HybridSparseError


def _dataset(n=32, seqlen=32):
    ids = random_tokens(n, seqlen, seed=1)
    ids[:, 1::2] = ids[:, ::2]  # something learnable: every odd token repeats the previous one
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=24,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        use_cpu=True,
        report_to=[],
        logging_steps=4,
        save_strategy="no",
        disable_tqdm=True,
    )
    return TrainingArguments(**(base | kw))


def _check_sparse_and_trained(model, masks, before):
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        p = params[name]
        assert (p[~mask] == 0).all(), f"{name}: a pruned weight came back"
        assert not torch.equal(p[mask], before[name][mask]), f"{name}: kept weights did not train"


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("bf16", [False, True])
def test_full_finetune_keeps_every_pruned_weight_zero(tmp_path, bf16):
    model = pruned_tiny()
    masks = {k: v.clone() for k, v in sparsity_masks(model).items()}
    before = copy.deepcopy(model.state_dict())
    args = _args(tmp_path, weight_decay=0.1, gradient_accumulation_steps=2, max_grad_norm=0.5, bf16=bf16)
    trainer = SparseTrainer(model=model, args=args, train_dataset=_dataset())
    trainer.train()
    _check_sparse_and_trained(model, masks, before)
    losses = _losses(trainer)
    assert losses[-1] < losses[0]


def test_gradients_of_pruned_weights_are_zero_before_clipping(tmp_path):
    model = pruned_tiny()
    cb = SparsityMaskCallback()
    cb.attach(model)
    out = model(input_ids=random_tokens(2, 16), labels=random_tokens(2, 16))
    out.loss.backward()
    for name, param, mask in cb.entries:
        assert (param.grad[~mask] == 0).all(), name
        assert param.grad[mask].abs().sum() > 0


def test_callback_works_with_a_plain_trainer(tmp_path):
    model = pruned_tiny(pattern="2:4")
    masks = {k: v.clone() for k, v in sparsity_masks(model).items()}
    before = copy.deepcopy(model.state_dict())
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, weight_decay=0.3, max_steps=8),
        train_dataset=_dataset(),
        callbacks=[SparsityMaskCallback()],
    )
    trainer.train()
    _check_sparse_and_trained(model, masks, before)


def test_plain_trainer_keeps_the_sparsity_the_model_carries(tmp_path):
    """No SparseTrainer, no callback: the model's own gradient masking keeps every pruned weight at zero."""
    model = pruned_tiny()
    masks = {k: v.clone() for k, v in sparsity_masks(model).items()}
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    Trainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=_dataset()).train()
    _check_sparse_and_trained(model, masks, before)


def test_without_the_sparsity_state_plain_training_revives_weights(tmp_path):
    """The guarantee above is not vacuous: with the state removed, AdamW with weight decay revives pruned weights."""
    from hf_hybrid_sparse.state import clear_state

    model = pruned_tiny()
    masks = sparsity_masks(model)
    clear_state(model)
    Trainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=_dataset()).train()
    params = dict(model.named_parameters())
    assert any((params[k][~m] != 0).any() for k, m in masks.items())


def test_masks_derived_from_zeros_with_a_warning(tmp_path, caplog):
    model = pruned_tiny()
    from hf_hybrid_sparse.state import clear_state

    clear_state(model)
    with caplog.at_level("WARNING"):
        trainer = SparseTrainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=_dataset())
    assert "derived from the zeros" in caplog.text
    assert len(trainer.sparsity_callback.entries) == 14
    derived = {name: mask.clone() for name, _, mask in trainer.sparsity_callback.entries}
    trainer.train()
    params = dict(model.named_parameters())
    for name, mask in derived.items():
        assert (params[name][~mask] == 0).all(), name
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            assert (p == 0).float().mean() > 0.3


def test_dense_model_is_refused_unless_allowed(tmp_path):
    with pytest.raises(SparsityError, match="no sparsity state and no zero weights"):
        SparseTrainer(model=tiny_model("llama"), args=_args(tmp_path), train_dataset=_dataset())
    SparseTrainer(model=tiny_model("llama"), args=_args(tmp_path), train_dataset=_dataset(), allow_dense=True)


def test_mask_shape_mismatch_is_refused(tmp_path):
    model = pruned_tiny()
    layer = model.model.layers[0].mlp.up_proj
    layer.weight = torch.nn.Parameter(torch.zeros(160, 64))  # resized after pruning
    with pytest.raises(
        SparsityError,
        match=r"up_proj\.weight: the mask has shape \[128, 64\] but the parameter has \[160, 64\]",
    ):
        SparseTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset())


def test_resume_with_different_masks_is_refused(tmp_path):
    model = pruned_tiny()
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    SparseTrainer(model=model, args=args, train_dataset=_dataset()).train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert ckpt.exists()
    same = pruned_tiny()
    SparseTrainer(
        model=same, args=_args(tmp_path, max_steps=3, save_strategy="no"), train_dataset=_dataset()
    ).train(resume_from_checkpoint=str(ckpt))
    other = tiny_model("llama", seed=5)
    apply_hybrid_sparsity(other, HybridSparseConfig(nsamples=4, seqlen=32), random_tokens(4, 32, seed=9))
    trainer = SparseTrainer(model=other, args=_args(tmp_path, max_steps=3), train_dataset=_dataset())
    with pytest.raises(SparsityError, match="the checkpoint's mask differs"):
        trainer.train(resume_from_checkpoint=str(ckpt))


@pytest.mark.parametrize(
    "family, targets", [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"])]
)
def test_masked_lora_merges_exactly_and_keeps_sparsity(tmp_path, family, targets):
    model = pruned_tiny(family)
    masks = {k: v.clone() for k, v in sparsity_masks(model).items()}
    cfg = LoraConfig(r=4, target_modules=targets, fan_in_fan_out=family == "gpt2")
    peft_model = get_sparse_peft_model(model, cfg)
    trainer = SparseTrainer(
        model=peft_model, args=_args(tmp_path, learning_rate=1e-2, max_steps=12), train_dataset=_dataset()
    )
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0]
    peft_model.eval()
    probe = random_tokens(2, 16, seed=4)
    with torch.no_grad():
        unmerged = peft_model(input_ids=probe).logits
    merged, report = merge_sparse_lora(peft_model)
    merged.eval()
    with torch.no_grad():
        got = merged(input_ids=probe).logits
    assert torch.allclose(unmerged, got, atol=1e-4), float((unmerged - got).abs().max())
    assert report.mode == "masked" and report.max_removed_fraction == 0.0 and report.layers
    after = sparsity_masks(merged)
    params = dict(merged.named_parameters())
    assert after.keys() == masks.keys()
    for k, m in masks.items():
        assert torch.equal(after[k], m)
        assert ((params[k] != 0) == m).float().mean() > 0.999  # exactly the pruned model's zeros
        assert (params[k][~m] == 0).all()


def test_vanilla_lora_remask_reports_what_it_removed(tmp_path):
    model = pruned_tiny()
    peft_model = get_sparse_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), mode="remask"
    )
    merged, report = merge_sparse_lora(peft_model)
    assert report.mode == "remask" and 0.1 < report.max_removed_fraction < 1.0
    assert "removed share" in report.to_markdown()
    for name, mask in sparsity_masks(merged).items():
        assert (dict(merged.named_parameters())[name][~mask] == 0).all()


def test_lora_bad_input():
    with pytest.raises(HybridSparseError, match="no sparsity state"):
        get_sparse_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(HybridSparseError, match="mode="):
        get_sparse_peft_model(pruned_tiny(), LoraConfig(r=2, target_modules=["q_proj"]), mode="dense")


def test_merged_model_saves_and_reloads_sparse(tmp_path):
    from transformers import AutoModelForCausalLM

    peft_model = get_sparse_peft_model(
        pruned_tiny(), LoraConfig(r=4, target_modules=["o_proj"], init_lora_weights=False)
    )
    merged, _ = merge_sparse_lora(peft_model)
    merged.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    a, b = sparsity_masks(merged), sparsity_masks(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


WORKER = Path(__file__).with_name("distributed_worker.py")


@pytest.mark.parametrize("mode", ["ddp", "fsdp2-manual", "fsdp"])
def test_two_cpu_processes_keep_the_masks(tmp_path, mode):
    env = subprocess_env(OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(WORKER),
        mode,
        str(tmp_path),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    out = res.stdout + res.stderr
    if mode == "fsdp" and res.returncode == 0 and out.count("FSDP_UNSUPPORTED") == 2:
        pytest.skip(
            "FSDP does not run on CPU/gloo with this torch/accelerate: "
            + out.split("FSDP_UNSUPPORTED")[1][:300]
        )
    assert res.returncode == 0, out[-4000:]
    assert out.count("RANK_OK") == 2, out[-2000:]


def test_saved_adapter_reloads_mask_aware_on_the_pruned_base(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_hybrid_sparse import load_sparse_peft_model

    base = pruned_tiny()
    base.save_pretrained(tmp_path / "base")
    peft_model = get_sparse_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    probe = random_tokens(2, 12, seed=4)
    with torch.no_grad():
        expected = peft_model(input_ids=probe).logits
    reloaded = load_sparse_peft_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(tmp_path / "adapter")
    )
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=probe).logits, expected, atol=1e-5)
    merged, report = merge_sparse_lora(reloaded)
    assert report.mode == "masked"
    for name, mask in sparsity_masks(merged).items():
        assert (dict(merged.named_parameters())[name][~mask] == 0).all()
    with pytest.raises(HybridSparseError, match="no sparsity state"):
        load_sparse_peft_model(tiny_model("llama"), str(tmp_path / "adapter"))
