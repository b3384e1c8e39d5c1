"""Prune with the quality options, then recover by distilling from the dense teacher (offline, seconds).

python examples/distill_recovery.py

A tiny random Llama stands in for a real model: it is pruned into hybrid tiers with the loss-aware tier rule
and OWL's layer-wise allocation, then fine-tuned for 30 steps against a frozen copy of the dense model
(KL on logits plus the per-block hidden-state loss). The KL to the teacher falls, and no pruned weight
comes back.
"""

import tempfile

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, TrainingArguments

from hf_hybrid_sparse import (
    DistillationConfig,
    HybridSparseConfig,
    SparseTrainer,
    apply_hybrid_sparsity,
    dense_teacher,
    sparsity_masks,
)


@torch.no_grad()
def kl_to(teacher, student, ids) -> float:
    student.eval()
    p = F.log_softmax(teacher(ids).logits, -1)
    q = F.log_softmax(student(ids).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # sharper random weights, so the teacher's predictions are worth matching
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    teacher = dense_teacher(model)
    ids = torch.randint(0, 128, (32, 32), generator=torch.Generator().manual_seed(0))
    recipe = HybridSparseConfig(
        nsamples=8, seqlen=32, tier_rule="loss", layer_allocation="owl", owl_lambda=0.1
    )
    report = apply_hybrid_sparsity(model, recipe, ids[:8])
    print(report.summary())
    held_out = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    before = kl_to(teacher, model, held_out)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=30, per_device_train_batch_size=4, learning_rate=1e-2,
            use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=10,
        )  # fmt: skip
        SparseTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"input_ids": ids.tolist()}),
            teacher_model=teacher,
            distillation=DistillationConfig(temperature=1.0, hidden_weight=1.0),
        ).train()
    after = kl_to(teacher, model, held_out)
    params = dict(model.named_parameters())
    revived = sum(int((params[n][~m] != 0).sum()) for n, m in sparsity_masks(model).items())
    print(f"KL to the dense teacher: {before:.4f} -> {after:.4f}; pruned weights revived: {revived}")


if __name__ == "__main__":
    main()
