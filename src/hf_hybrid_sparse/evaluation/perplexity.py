"""Perplexity with the WikiText-2 protocol: join with "\\n\\n", non-overlapping ``seqlen`` windows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..data.calibration import check_seqlen, resolve_texts_or_tokens, tokenize_joined
from ..data.corpora import SOURCES, NamedSet, eval_tokens, named
from ..devices import input_device
from ..errors import CalibrationError
from ..logs import get_logger, tqdm

logger = get_logger(__name__)


@dataclass
class PerplexityResult:
    """Perplexity and how much was scored (``tokens`` = predicted tokens, ``windows`` of ``seqlen``)."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seqlen: int


@torch.no_grad()
def perplexity(
    model: Any,
    tokenizer: Any,
    data: Any = "wiki_offline",
    seqlen: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``data`` (a name, path, texts or token ids; default the offline test split).

    Texts are joined with ``"\\n\\n"`` and tokenized once; the ids are cut into non-overlapping
    windows of ``seqlen`` (the tail shorter than a window is dropped and reported in the log); in each
    window tokens 2..seqlen are predicted, so ``tokens = windows * (seqlen - 1)``.
    ``perplexity = exp(total NLL / tokens)``.
    """
    check_seqlen(model, seqlen)
    if isinstance(data, NamedSet) or (isinstance(data, str) and data in SOURCES):
        ids = eval_tokens(data if isinstance(data, NamedSet) else named(data), tokenizer, seqlen)
    else:
        kind, items = resolve_texts_or_tokens(data, split="test")
        if kind == "text":
            limit = None if max_windows is None else max_windows * seqlen
            ids = tokenize_joined(items, tokenizer, max_tokens=limit)
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
    for start in tqdm(range(0, n_windows, batch_size), desc="Perplexity", unit="batch"):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
    tokens = n_windows * (seqlen - 1)
    return PerplexityResult(math.exp(total / tokens), total, tokens, n_windows, seqlen)
