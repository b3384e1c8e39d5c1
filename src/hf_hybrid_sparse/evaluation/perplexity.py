"""Perplexity with the WikiText-2 protocol: join with "\\n\\n", non-overlapping ``seqlen`` windows."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..data.calibration import (
    check_seqlen,
    describe_source,
    evaluation_split,
    resolve_texts_or_tokens,
    tokenize_joined,
)
from ..data.corpora import SOURCES, NamedSet, eval_tokens, named
from ..devices import input_device
from ..errors import CalibrationError
from ..logs import get_logger, tqdm, warn_if_long

logger = get_logger(__name__)


@dataclass
class PerplexityResult:
    """Perplexity and how much was scored (``tokens`` = predicted tokens, ``windows`` of ``seqlen``)."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    corpus: str = ""

    def protocol(self) -> str:
        """How the number was measured, printed beside it (different protocols give different numbers)."""
        corpus = f"{self.corpus}: " if self.corpus else ""
        return f"{corpus}{self.windows} windows x {self.seqlen} tokens, {self.tokens} predicted tokens"


@torch.no_grad()
def perplexity(
    model: Any,
    tokenizer: Any,
    data: Any = "wiki_offline",
    seqlen: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    add_special_tokens: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``data`` (a name, path, texts or token ids; default the offline test split).

    Texts are joined with ``"\\n\\n"`` and tokenized once; the ids are cut into non-overlapping
    windows of ``seqlen`` (the tail shorter than a window is dropped and reported in the log); in each
    window tokens 2..seqlen are predicted, so ``tokens = windows * (seqlen - 1)``.
    ``perplexity = exp(total NLL / tokens)``. Text is tokenized with the tokenizer's special tokens
    (a BOS at the start where the tokenizer adds one), as the reference Wanda/SparseGPT evaluation does.
    """
    check_seqlen(model, seqlen)
    if isinstance(data, NamedSet) or (isinstance(data, str) and data in SOURCES):
        spec = data if isinstance(data, NamedSet) else named(data)
        ids = eval_tokens(spec, tokenizer, seqlen, add_special_tokens=add_special_tokens)
    else:
        kind, items = resolve_texts_or_tokens(data, split="test", tokenizer=tokenizer)
        if kind == "text":
            limit = None if max_windows is None else max_windows * seqlen
            ids = tokenize_joined(items, tokenizer, max_tokens=limit, add_special_tokens=add_special_tokens)
        else:
            ids = torch.cat([t.reshape(-1) for t in items])
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise CalibrationError(
            f"The evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}."
        )
    dropped = ids.numel() - n_windows * seqlen
    if dropped:
        logger.info(
            f"perplexity: scoring {n_windows} windows of {seqlen}; {dropped} trailing tokens not used"
        )
    windows = ids[: n_windows * seqlen].reshape(n_windows, seqlen)
    device = input_device(model)
    total = 0.0
    started = time.perf_counter()
    for start in tqdm(range(0, n_windows, batch_size), desc="Perplexity", unit="batch"):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        if start == 0:
            warn_if_long(
                logger,
                f"Perplexity on {n_windows} windows of {seqlen} tokens",
                time.perf_counter() - started,
                -(-n_windows // batch_size),
                "max_windows (--max_windows / --eval_windows) or a shorter seqlen lowers it.",
            )
    tokens = n_windows * (seqlen - 1)
    return PerplexityResult(math.exp(total / tokens), total, tokens, n_windows, seqlen, _corpus(data))


def _corpus(data: Any) -> str:
    name = describe_source(data)
    split = evaluation_split(name) if isinstance(data, (str, NamedSet)) else None
    return f"{name} {split} split" if split else name
