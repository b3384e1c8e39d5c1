"""Named calibration / evaluation sets loaded with ``datasets``, each following its published protocol.

| name | source (``datasets.load_dataset``) | calibration rule | evaluation rule |
|---|---|---|---|
| ``wikitext2`` | ``Salesforce/wikitext``, ``wikitext-2-raw-v1`` | train texts joined with ``" "``, random ``seqlen`` windows | test joined with ``"\\n\\n"``, non-overlapping windows |
| ``c4`` | ``allenai/c4``, ``en/c4-train.00000-of-01024.json.gz`` | random documents longer than ``seqlen``, a random window in each | validation shard 00000: first 1100 documents joined with ``" "``, first ``256 * seqlen`` tokens |
| ``squad`` | ``rajpurkar/squad_v2`` | ``Context: ...\\nQuestion: ...\\nAnswer: ...`` examples, packed | (task metrics: see evaluation) |
| ``gsm8k`` | ``openai/gsm8k``, ``main`` | ``Question: ...\\nAnswer: ...`` examples, packed | (task metrics: see evaluation) |

Texts are tokenized with the tokenizer's special tokens (``add_special_tokens=True``, the reference
loaders' default: a BOS where the tokenizer adds one); pass ``add_special_tokens=False`` to drop them.
Random choices use ``random.Random(seed)`` as the Wanda/SparseGPT loaders do (with their own
generator instead of the global one). **Packing rule** for short task examples: the examples are
shuffled with the seed, each is tokenized and followed by the EOS token, the stream is cut into
consecutive ``seqlen`` windows and the first ``nsamples`` are used -- no padding, so no statistic is
skewed by pad tokens. A tokenizer without an EOS token is refused for packing.

Tests and offline users feed the same code from local files: ``named("squad", data_files={...})``
loads the upstream columns from local JSON/parquet files (``datasets``' ``json``/``parquet`` builders).
Mixtures: ``"wikitext2:0.5,gsm8k:0.5"`` (weights must sum to 1; sample counts use cumulative
round-half-up, so they add up to ``nsamples``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CalibrationError


@dataclass
class NamedSet:
    """A named dataset and where to load it from (the Hub by default, or local ``data_files``)."""

    name: str
    data_files: dict[str, str | list[str]] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def load(self, split: str):
        """The ``datasets.Dataset`` of ``split`` with the upstream columns."""
        from datasets import load_dataset

        spec = SOURCES[self.name]
        if self.data_files is not None:
            if split not in self.data_files:
                raise CalibrationError(
                    f"{self.name}: no local file given for split {split!r} (have {sorted(self.data_files)})."
                )
            files = self.data_files[split]
            first = files[0] if isinstance(files, list) else files
            builder = "parquet" if str(first).endswith(".parquet") else "json"
            ds = load_dataset(builder, data_files={split: files}, split=split, **self.kwargs)
        else:
            args = [spec["path"]] + ([spec["config"]] if spec.get("config") else [])
            extra = {}
            if spec.get("data_files"):
                extra["data_files"] = spec["data_files"]
            ds = load_dataset(*args, split=spec.get("splits", {}).get(split, split), **extra, **self.kwargs)
        missing = [c for c in spec["columns"] if c not in ds.column_names]
        if missing:
            raise CalibrationError(
                f"{self.name}: the data has no column(s) {missing}; its columns are {ds.column_names}."
            )
        return ds


SOURCES: dict[str, dict[str, Any]] = {
    "wikitext2": {
        "path": "Salesforce/wikitext",
        "config": "wikitext-2-raw-v1",
        "columns": ["text"],
        "rule": "stream",
        "eval_split": "test",
        "title": "WikiText-2 (raw)",
    },
    "c4": {
        "path": "allenai/c4",
        "data_files": {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        "columns": ["text"],
        "rule": "documents",
        "eval_split": "validation",
        "subset": "en",  # the upstream subset the data files belong to
        "title": "C4 (en, validation shard 0)",
    },
    "squad": {
        "path": "rajpurkar/squad_v2",
        "columns": ["context", "question", "answers"],
        "rule": "examples",
        "eval_split": "validation",
        "title": "SQuAD v2",
    },
    "gsm8k": {
        "path": "openai/gsm8k",
        "config": "main",
        "columns": ["question", "answer"],
        "rule": "examples",
        "eval_split": "test",
        "title": "GSM8K",
    },
}


def named(name: str, data_files: dict[str, str | list[str]] | None = None, **kwargs: Any) -> NamedSet:
    """A :class:`NamedSet` (validated name), optionally read from local ``data_files``."""
    if name not in SOURCES:
        raise CalibrationError(f"Unknown dataset {name!r}; named sets are {', '.join(sorted(SOURCES))}.")
    return NamedSet(name, data_files, kwargs)


def squad_prompt(example: dict, with_answer: bool = True) -> str:
    """SQuAD v2 text: ``Context: ...\\nQuestion: ...\\nAnswer:`` (+ the first answer or ``unanswerable``)."""
    text = f"Context: {example['context']}\nQuestion: {example['question']}\nAnswer:"
    if with_answer:
        answers = example["answers"]["text"] if isinstance(example["answers"], dict) else example["answers"]
        text += " " + (answers[0] if answers else "unanswerable")
    return text


def gsm8k_prompt(example: dict, with_answer: bool = True) -> str:
    """GSM8K text: ``Question: ...\\nAnswer:`` (+ the reference solution)."""
    text = f"Question: {example['question']}\nAnswer:"
    return text + (" " + example["answer"] if with_answer else "")


PROMPTS = {"squad": squad_prompt, "gsm8k": gsm8k_prompt}


def texts(spec: NamedSet, split: str) -> list[str]:
    """The texts of a named set, formatted as its calibration rule expects."""
    ds = spec.load(split)
    if spec.name in PROMPTS:
        return [PROMPTS[spec.name](ex) for ex in ds]
    return [str(t) for t in ds["text"]]


def _eos(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise CalibrationError(
            "Packing task examples needs a tokenizer with an EOS token (eos_token_id is None)."
        )
    return int(eos)


def calibration_windows(
    spec: NamedSet, tokenizer: Any, nsamples: int, seqlen: int, seed: int, add_special_tokens: bool = True
) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids drawn from ``spec`` by its published rule (module docstring).

    Texts are tokenized with the tokenizer's special tokens as the reference loaders do (a BOS at the
    start of the stream / of each document / of each packed example); ``add_special_tokens=False``
    leaves them out.
    """
    rule = SOURCES[spec.name]["rule"]
    rng = random.Random(seed)
    special = add_special_tokens
    if rule == "stream":
        items = [t for t in texts(spec, "train")]
        ids = tokenizer(" ".join(items), add_special_tokens=special)["input_ids"]
        if len(ids) <= seqlen:
            raise CalibrationError(
                f"{spec.name}: the text has {len(ids)} tokens, fewer than seqlen+1={seqlen + 1}."
            )
        starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
        return torch.tensor([ids[s : s + seqlen] for s in starts], dtype=torch.long)
    if rule == "documents":
        docs = texts(spec, "train")
        if not docs:
            raise CalibrationError(f"{spec.name}: no documents.")
        out, tries = [], 0
        while len(out) < nsamples:
            tries += 1
            if tries > 200 * nsamples:
                raise CalibrationError(
                    f"{spec.name}: found {len(out)} of {nsamples} documents longer than seqlen={seqlen} "
                    f"among {len(docs)} documents; lower seqlen or use more data."
                )
            ids = tokenizer(docs[rng.randint(0, len(docs) - 1)], add_special_tokens=special)["input_ids"]
            if len(ids) <= seqlen:
                continue
            start = rng.randint(0, len(ids) - seqlen - 1)
            out.append(ids[start : start + seqlen])
        return torch.tensor(out, dtype=torch.long)
    examples = texts(spec, "train")
    rng.shuffle(examples)
    eos = _eos(tokenizer)
    stream: list[int] = []
    need = nsamples * seqlen
    for ex in examples:
        stream.extend(tokenizer(ex, add_special_tokens=special)["input_ids"] + [eos])
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise CalibrationError(
            f"{spec.name}: {len(examples)} examples pack into {len(stream)} tokens, {need} are needed "
            f"({nsamples} x {seqlen}); lower nsamples/seqlen."
        )
    return torch.tensor(stream[:need], dtype=torch.long).reshape(nsamples, seqlen)


def parse_mixture(text: str) -> list[tuple[str, float]]:
    """``"wikitext2:0.5,gsm8k:0.5"`` -> ``[("wikitext2", 0.5), ("gsm8k", 0.5)]`` (validated)."""
    parts = []
    for chunk in text.split(","):
        name, sep, weight = chunk.strip().partition(":")
        if not sep:
            raise CalibrationError(f"mixture part {chunk!r} is not NAME:WEIGHT.")
        try:
            w = float(weight)
        except ValueError:
            raise CalibrationError(f"mixture weight {weight!r} of {name!r} is not a number.") from None
        if w < 0 or not math.isfinite(w):
            raise CalibrationError(f"mixture weight of {name!r} is negative or not finite.")
        parts.append((name.strip(), w))
    total = sum(w for _, w in parts)
    if abs(total - 1.0) > 1e-6:
        raise CalibrationError(f"mixture weights {[w for _, w in parts]} sum to {total:.6g}, not 1.")
    return parts


def mixture_counts(weights: list[float], nsamples: int) -> list[int]:
    """Samples per component: cumulative round-half-up of ``weight * nsamples`` (they sum to ``nsamples``)."""
    counts, cum, prev = [], 0.0, 0
    for w in weights:
        cum += w
        upto = min(nsamples, math.floor(cum * nsamples + 0.5 + 1e-9))
        counts.append(upto - prev)
        prev = upto
    counts[-1] += nsamples - prev
    return counts


def eval_tokens(spec: NamedSet, tokenizer: Any, seqlen: int, add_special_tokens: bool = True) -> torch.Tensor:
    """The 1-D token stream that perplexity on ``spec`` scores (rules in the module docstring)."""
    rule, split = SOURCES[spec.name]["rule"], SOURCES[spec.name]["eval_split"]
    special = add_special_tokens
    if rule == "stream":
        items = texts(spec, split)
        return torch.tensor(
            tokenizer("\n\n".join(items), add_special_tokens=special)["input_ids"], dtype=torch.long
        )
    if rule == "documents":
        docs = texts(spec, split)[:1100]
        ids = tokenizer(" ".join(docs), add_special_tokens=special)["input_ids"][: 256 * seqlen]
        return torch.tensor(ids, dtype=torch.long)
    raise CalibrationError(f"{spec.name} is a task set: evaluate it with its task metric, not perplexity.")
