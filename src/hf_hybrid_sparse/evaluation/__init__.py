"""Measuring a (pruned) model: perplexity, SQuAD / GSM8K task metrics, zero-shot accuracy through lm-eval."""

from .perplexity import PerplexityResult, perplexity
from .tasks import evaluate_gsm8k, evaluate_squad
from .zero_shot import DEFAULT_LM_EVAL_TASKS, zero_shot

__all__ = [
    "PerplexityResult",
    "perplexity",
    "evaluate_gsm8k",
    "evaluate_squad",
    "zero_shot",
    "DEFAULT_LM_EVAL_TASKS",
]
