"""The whole user path on a tiny model, kept small so CI also runs it against the declared minimum
versions of transformers and peft (`.ci/run` installs them into a separate environment)."""

import torch
from tiny_models import random_tokens, tiny_model
from transformers import AutoModelForCausalLM, TrainingArguments

from hf_hybrid_sparse import (
    HybridSparseConfig,
    HybridSparseLinear,
    SparseTrainer,
    apply_hybrid_sparsity,
    get_sparse_peft_model,
    merge_sparse_lora,
    sparsity_masks,
)


def test_prune_save_reload_pack_and_train_lora(tmp_path):
    from datasets import Dataset
    from peft import LoraConfig

    model = tiny_model("llama")
    report = apply_hybrid_sparsity(model, HybridSparseConfig(nsamples=4, seqlen=32), random_tokens(4, 32))
    assert 0.3 < report.sparsity < 0.7
    masks = sparsity_masks(model)
    model.save_pretrained(tmp_path / "pruned")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert all(torch.equal(masks[k], v) for k, v in sparsity_masks(reloaded).items())
    packed = AutoModelForCausalLM.from_pretrained(
        tmp_path / "pruned", quantization_config=HybridSparseConfig(use_kernels=True)
    )
    assert any(isinstance(m, HybridSparseLinear) for m in packed.modules())
    ids = random_tokens(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, reloaded(ids).logits, rtol=1e-4, atol=1e-4)

    peft_model = get_sparse_peft_model(reloaded, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    rows = random_tokens(8, 32).tolist()
    args = TrainingArguments(
        output_dir=str(tmp_path / "t"), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True
    )
    trainer = SparseTrainer(
        peft_model, args, train_dataset=Dataset.from_dict({"input_ids": rows, "labels": rows})
    )
    metrics = trainer.train().metrics
    assert metrics["sparsity_verified_params"] == len(masks)  # the end-of-training check is reported
    assert abs(metrics["sparsity"] - report.sparsity) < 1e-9
    assert trainer.state.log_history[-1]["sparsity"] == metrics["sparsity"]
    merged, _ = merge_sparse_lora(peft_model)
    for name, mask in sparsity_masks(merged).items():
        assert torch.equal(mask, masks[name])
    weight = merged.model.layers[0].self_attn.q_proj.weight
    assert (weight[~masks["model.layers.0.self_attn.q_proj.weight"]] == 0).all()
