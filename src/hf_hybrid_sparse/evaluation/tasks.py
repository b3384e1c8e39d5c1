"""Task metrics: SQuAD v2 exact match / F1 and GSM8K accuracy from greedy generations.

* SQuAD v2 uses the official answer normalisation (lower case, strip punctuation and the articles
  a/an/the, collapse whitespace); EM and F1 are the maxima over the gold answers; an unanswerable
  question has the single gold answer ``""``, and a prediction of ``unanswerable`` (the word our
  prompt format uses) counts as the empty answer.
* GSM8K compares the last number in the generation with the number after ``####`` in the
  reference (commas and a trailing ``.`` removed, compared as numbers).
* Generation is greedy, batched with left padding; prompts are the zero-shot formats of
  :mod:`hf_hybrid_sparse.data.corpora`.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any

import torch

from ..data.corpora import SOURCES, NamedSet, gsm8k_prompt, named, squad_prompt
from ..devices import input_device
from ..errors import CalibrationError
from ..logs import get_logger, tqdm

logger = get_logger(__name__)


def normalize_answer(text: str) -> str:
    """SQuAD's official normalisation."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def squad_exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    pred, ref = _tokens(prediction), _tokens(gold)
    if not pred or not ref:
        return float(pred == ref)  # both empty: 1; one empty: 0
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, golds: list[str]) -> tuple[float, float]:
    """``(EM, F1)`` of one prediction against its gold answers (``[]`` = unanswerable)."""
    prediction = "" if normalize_answer(prediction) == "unanswerable" else prediction
    golds = [g for g in golds if normalize_answer(g)] or [""]
    return max(squad_exact(prediction, g) for g in golds), max(squad_f1(prediction, g) for g in golds)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number in ``text`` (commas removed), or ``None``."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def gsm8k_reference(answer: str) -> float:
    """The number after ``####`` in a GSM8K reference solution."""
    if "####" not in answer:
        raise CalibrationError("A GSM8K reference answer has no '####' final answer.")
    value = last_number(answer.split("####")[-1])
    if value is None:
        raise CalibrationError(f"No number after '####' in {answer[-40:]!r}.")
    return value


def gsm8k_correct(generation: str, reference_answer: str) -> bool:
    """Whether the last number of ``generation`` equals the reference's final answer."""
    got = last_number(generation.split("Question:")[0])  # ignore a hallucinated next question
    return got is not None and abs(got - gsm8k_reference(reference_answer)) < 1e-6


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8, stop: str | None = None
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), cut at ``stop`` if given."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise CalibrationError("Batched generation needs a tokenizer with a pad or EOS token.")
    side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = input_device(model)
    outputs = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="Generating", unit="batch"):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            for row in out[:, enc["input_ids"].shape[1] :]:
                text = tokenizer.decode(row, skip_special_tokens=True)
                outputs.append(text.split(stop)[0] if stop else text)
    finally:
        tokenizer.padding_side = side
        tokenizer.pad_token = pad_token
    return outputs


def _task_split(data: Any, default: str, max_samples: int | None):
    spec = data if isinstance(data, NamedSet) else named(data or default)
    ds = spec.load(SOURCES[default]["eval_split"])
    return ds.select(range(min(max_samples, len(ds)))) if max_samples is not None else ds


def evaluate_squad(
    model, tokenizer, data: Any = "squad", max_samples: int | None = 200, batch_size: int = 8
) -> dict:
    """SQuAD v2 validation EM/F1 (percent) of greedy zero-shot answers; also split by answerable or not."""
    ds = _task_split(data, "squad", max_samples)
    prompts = [squad_prompt(ex, with_answer=False) for ex in ds]
    preds = generate(model, tokenizer, prompts, max_new_tokens=32, batch_size=batch_size, stop="\n")
    ems, f1s, has = [], [], []
    for ex, pred in zip(ds, preds):
        em, f1 = squad_scores(pred.strip(), list(ex["answers"]["text"]))
        ems.append(em)
        f1s.append(f1)
        has.append(bool(ex["answers"]["text"]))

    def mean(xs, sel=None):
        xs = [x for x, s in zip(xs, sel or [True] * len(xs)) if s]
        return 100.0 * sum(xs) / len(xs) if xs else float("nan")

    return {
        "exact_match": mean(ems),
        "f1": mean(f1s),
        "has_answer_f1": mean(f1s, has),
        "no_answer_exact_match": mean(ems, [not h for h in has]),
        "n": len(ems),
    }


def evaluate_gsm8k(
    model,
    tokenizer,
    data: Any = "gsm8k",
    max_samples: int | None = 200,
    batch_size: int = 8,
    max_new_tokens: int = 256,
) -> dict:
    """GSM8K test accuracy (percent) of greedy zero-shot solutions (last number vs ``####`` answer)."""
    ds = _task_split(data, "gsm8k", max_samples)
    prompts = [gsm8k_prompt(ex, with_answer=False) for ex in ds]
    gens = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    correct = [gsm8k_correct(g, ex["answer"]) for g, ex in zip(gens, ds)]
    return {"accuracy": 100.0 * sum(correct) / len(correct), "n": len(correct)}
