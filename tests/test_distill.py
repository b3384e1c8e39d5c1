"""Distillation from the dense teacher: it lowers the KL to the teacher and never revives a pruned weight."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_trainer import _args, _dataset
from tiny_models import random_tokens, tiny_model
from transformers import TrainingArguments

from hf_hybrid_sparse import (
    DistillationConfig,
    HybridSparseConfig,
    SparseTrainer,
    apply_hybrid_sparsity,
    dense_teacher,
    get_sparse_peft_model,
    sparsity_masks,
)
from hf_hybrid_sparse.errors import ConfigError


def _student_and_teacher():
    model = tiny_model("llama")
    with torch.no_grad():  # a random model is nearly uniform; sharper weights give a teacher worth matching
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    teacher = dense_teacher(model)
    apply_hybrid_sparsity(model, HybridSparseConfig(nsamples=4, seqlen=32), random_tokens(4, 32))
    return model, teacher


@torch.no_grad()
def _kl(student, teacher, ids, t=1.0):
    student.eval()
    s = F.log_softmax(student(ids).logits / t, -1)
    p = F.log_softmax(teacher(ids).logits / t, -1)
    return float((p.exp() * (p - s)).sum(-1).mean())


def _revived(model, masks):
    params = dict(model.named_parameters())
    return sum(int((params[n][~m] != 0).sum()) for n, m in masks.items())


@pytest.mark.parametrize("hidden_weight", [0.0, 1.0])
def test_distillation_lowers_the_kl_to_the_teacher_and_keeps_every_mask(tmp_path, hidden_weight):
    student, teacher = _student_and_teacher()
    masks = {k: v.clone() for k, v in sparsity_masks(student).items()}
    ids = random_tokens(4, 32, seed=7)
    before = _kl(student, teacher, ids)
    trainer = SparseTrainer(
        model=student,
        args=_args(tmp_path, max_steps=30, learning_rate=1e-2),
        train_dataset=_dataset(),
        teacher_model=teacher,
        distillation=DistillationConfig(temperature=1.0, hidden_weight=hidden_weight),
    )
    trainer.train()
    after = _kl(student, teacher, ids)
    assert after < 0.8 * before, (before, after)
    assert _revived(student, masks) == 0
    logged = [h for h in trainer.state.log_history if "distill_kl" in h]
    assert logged and ("distill_hidden" in logged[0]) == (hidden_weight > 0)
    assert all(p.grad is None for p in teacher.parameters())


def test_distillation_through_sparse_lora(tmp_path):
    from peft import LoraConfig

    student, teacher = _student_and_teacher()
    masks = {k: v.clone() for k, v in sparsity_masks(student).items()}
    ids = random_tokens(4, 32, seed=7)
    before = _kl(student, teacher, ids)
    peft_model = get_sparse_peft_model(student, LoraConfig(r=8, target_modules="all-linear"))
    SparseTrainer(
        model=peft_model,
        args=_args(tmp_path, max_steps=20, learning_rate=5e-3),
        train_dataset=_dataset(),
        teacher_model=teacher,
    ).train()
    merged = peft_model.merge_and_unload()
    assert _kl(merged, teacher, ids) < before
    assert _revived(merged, masks) == 0


def test_a_teacher_with_another_vocabulary_is_refused_before_training(tmp_path):
    student, _ = _student_and_teacher()
    from transformers import AutoModelForCausalLM, LlamaConfig

    other = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
        )
    )
    with pytest.raises(ConfigError, match="vocabulary"):
        SparseTrainer(model=student, args=_args(tmp_path), train_dataset=_dataset(), teacher_model=other)
    with pytest.raises(ConfigError, match="teacher_model"):
        SparseTrainer(model=student, args=_args(tmp_path), train_dataset=_dataset(), distillation={})


def test_a_teacher_tokenizer_with_other_ids_is_refused(tmp_path):
    student, teacher = _student_and_teacher()

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    args = _args(tmp_path)
    with pytest.raises(ConfigError, match="tokenizer"):
        SparseTrainer(
            model=student,
            args=args,
            train_dataset=_dataset(),
            processing_class=Tok({"a": 0, "b": 1}),
            teacher_model=teacher,
            teacher_tokenizer=Tok({"a": 1, "b": 0}),
        )


def test_distillation_config_round_trip_and_errors():
    cfg = DistillationConfig(temperature=3, ce_weight=0.5)
    assert DistillationConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="temperature"):
        DistillationConfig(temperature=0)
    with pytest.raises(ConfigError, match="not all zero"):
        DistillationConfig(kl_weight=0)
    with pytest.raises(ConfigError, match="Unknown"):
        DistillationConfig.from_dict({"temp": 2})
    assert isinstance(copy.deepcopy(cfg), DistillationConfig)
    assert TrainingArguments  # the trainer's own arguments stay the usual ones
