"""Distillation from the dense teacher: KL on logits with a temperature, optionally per-block hidden states.

The hidden-state term is the normalised MSE of "Sparse Fine-tuning for Inference Acceleration of LLMs"
(Kurtić et al., 2023, SquareHead): for every decoder block, ``||h_s - h_t||^2 / ||h_t||^2`` averaged over
the blocks, so every block weighs the same whatever the scale of its activations.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import input_device
from ..errors import ConfigError


@dataclass
class DistillationConfig:
    """How the student learns from the teacher; the loss is
    ``ce_weight * CE + kl_weight * T^2 * KL(teacher_T || student_T) + hidden_weight * normalised MSE``.

    Args:
        temperature: softens both distributions (``T``); the KL is scaled by ``T^2`` (Hinton et al.).
        kl_weight: weight of the logit KL.
        ce_weight: weight of the ordinary next-token loss on the labels.
        hidden_weight: weight of the per-block normalised hidden-state MSE (0 disables it and saves memory).
            The term is the mean over blocks, so a weight near the number of blocks gives the sum over
            layers of Kurtić et al.'s SquareHead loss.
    """

    temperature: float = field(
        default=2.0, metadata={"help": "Distillation temperature T (KL scaled by T^2)."}
    )
    kl_weight: float = field(
        default=1.0, metadata={"help": "Weight of the KL between teacher and student logits."}
    )
    ce_weight: float = field(
        default=0.0, metadata={"help": "Weight of the next-token cross-entropy on the labels."}
    )
    hidden_weight: float = field(
        default=0.0, metadata={"help": "Weight of the per-block normalised hidden-state MSE (SquareHead)."}
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ConfigError(f"distillation {f.name} must be a number, got {value!r}.")
            setattr(self, f.name, float(value))
        if self.temperature <= 0:
            raise ConfigError(f"distillation temperature={self.temperature} must be positive.")
        weights = (self.kl_weight, self.ce_weight, self.hidden_weight)
        if min(weights) < 0 or max(weights) == 0:
            raise ConfigError(
                f"distillation weights (kl {self.kl_weight}, ce {self.ce_weight}, hidden {self.hidden_weight}) "
                "must be non-negative and not all zero."
            )

    def to_dict(self) -> dict[str, float]:
        """Plain dict (``from_dict`` turns it back into an equal config)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> DistillationConfig:
        """Build from :meth:`to_dict` output; unknown keys raise."""
        unknown = sorted(set(config_dict) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"Unknown DistillationConfig field(s): {', '.join(unknown)}.")
        return cls(**config_dict)


def _vocab(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "num_hidden_layers", None)


def check_tokenizers(student_tokenizer: Any, teacher_tokenizer: Any) -> None:
    """Raise :class:`ConfigError` if both tokenizers are given and map tokens to different ids."""
    if student_tokenizer is None or teacher_tokenizer is None:
        return
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ConfigError(
            "The teacher's tokenizer maps tokens to different ids than the student's; use the tokenizer "
            "the student was trained with for both (e.g. the unpruned model as teacher)."
        )


def check_teacher(
    student: nn.Module,
    teacher: nn.Module,
    config: DistillationConfig,
    student_tokenizer: Any = None,
    teacher_tokenizer: Any = None,
) -> None:
    """Raise :class:`ConfigError` before training if ``teacher`` cannot teach ``student``.

    The vocabularies must match (same output size and, when both tokenizers are given, the same token
    ids); the hidden-state loss also needs the same number of blocks and hidden size.
    """
    vs, vt = _vocab(student), _vocab(teacher)
    if vs is None or vt is None or vs != vt:
        raise ConfigError(
            f"The teacher's vocabulary ({vt} logits) differs from the student's ({vs}): distillation compares "
            "logits token by token, so use a teacher with the student's tokenizer (e.g. the unpruned model)."
        )
    check_tokenizers(student_tokenizer, teacher_tokenizer)
    if config.hidden_weight > 0:
        ls, lt = _layers(student), _layers(teacher)
        hs = getattr(getattr(student, "config", None), "hidden_size", None)
        ht = getattr(getattr(teacher, "config", None), "hidden_size", None)
        if ls != lt or hs != ht:
            raise ConfigError(
                f"hidden_weight > 0 compares block outputs, but the teacher has {lt} blocks of width {ht} and "
                f"the student {ls} of width {hs}; set hidden_weight=0 or use the unpruned model as teacher."
            )


def prepare_teacher(teacher: nn.Module) -> nn.Module:
    """Freeze ``teacher`` for distillation (eval mode, no gradients); returns it."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def dense_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` as it is now (call it before pruning to keep the dense teacher)."""
    return prepare_teacher(copy.deepcopy(model))


def _valid_positions(inputs: dict[str, Any], logits: torch.Tensor) -> torch.Tensor:
    """``[B, L-1]`` positions whose next token is trained on (labels not -100, else the attention mask)."""
    labels = inputs.get("labels")
    if labels is not None:
        return labels[:, 1:].to(logits.device) != -100
    mask = inputs.get("attention_mask")
    if mask is not None:
        return mask[:, 1:].to(logits.device).bool()
    return torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)[:, 1:]


def distillation_loss(
    student_out: Any,
    teacher_out: Any,
    inputs: dict[str, Any],
    config: DistillationConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The combined loss (a per-batch mean) and its parts, from both models' outputs on ``inputs``."""
    logits = student_out.logits
    valid = _valid_positions(inputs, logits)
    n = valid.sum().clamp_min(1)
    parts: dict[str, torch.Tensor] = {}
    total = logits.new_zeros(())
    if config.kl_weight:
        t = config.temperature
        s_logp = F.log_softmax(logits[:, :-1].float() / t, dim=-1)
        t_logp = F.log_softmax(teacher_out.logits[:, :-1].to(logits.device).float() / t, dim=-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
        parts["kl"] = (kl * valid).sum() / n * (t * t)
        total = total + config.kl_weight * parts["kl"]
    if config.ce_weight:
        if getattr(student_out, "loss", None) is None:
            raise ConfigError(
                "ce_weight > 0 needs `labels` in the batch (a causal-LM data collator adds them)."
            )
        parts["ce"] = student_out.loss
        total = total + config.ce_weight * parts["ce"]
    if config.hidden_weight:
        attn = inputs.get("attention_mask")
        losses = []
        for hs, ht in zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:]):
            ht = ht.to(hs.device).float()
            tokens = (
                torch.ones(hs.shape[:2], device=hs.device) if attn is None else attn.to(hs.device).float()
            )
            err = ((hs.float() - ht).pow(2).sum(-1) * tokens).sum()
            losses.append(err / (ht.pow(2).sum(-1) * tokens).sum().clamp_min(1e-12))
        parts["hidden"] = torch.stack(losses).mean()
        total = total + config.hidden_weight * parts["hidden"]
    return total, {k: float(v.detach()) for k, v in parts.items()}


@torch.no_grad()
def teacher_forward(teacher: nn.Module, inputs: dict[str, Any], hidden: bool) -> Any:
    """The teacher's outputs on ``inputs`` (moved to the teacher's device; labels are not passed)."""
    device = input_device(teacher)
    fed = {
        k: (v.to(device) if isinstance(v, torch.Tensor) else v)
        for k, v in inputs.items()
        if k not in ("labels", "num_items_in_batch")
    }
    return teacher(**fed, output_hidden_states=hidden, use_cache=False)
