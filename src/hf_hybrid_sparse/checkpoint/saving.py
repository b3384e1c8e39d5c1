"""Saving pruned models atomically: write a temporary sibling folder, then rename it into place."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPORT_FILE = "hybrid_sparse_report.json"
# files a save_pretrained call owns: replaced wholesale, never carried over from an older save
_MODEL_FILES = re.compile(
    r"^(model|pytorch_model|adapter_model)(-\d{5}-of-\d{5})?(\.[\w-]+)?\.(safetensors|bin)(\.index\.json)?$"
    r"|^(config|generation_config)\.json$"
)


def _atomic_folder(save_directory: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` into a temporary sibling folder, then put it in place of ``save_directory``.

    Files in an existing folder that the save does not own (e.g. a Trainer's optimizer state) are moved
    into the new folder first; the old model files are dropped with the old folder.
    """
    target = Path(save_directory).resolve()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the saved model should look like any other folder
    try:
        write(tmp)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _swap_into_place(tmp: Path, target: Path) -> None:
    backup = None
    if target.exists():
        for entry in target.iterdir():
            if not (tmp / entry.name).exists() and not _MODEL_FILES.match(entry.name):
                os.replace(entry, tmp / entry.name)
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, backup / target.name)
    os.replace(tmp, target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def save_pretrained(
    model: Any, save_directory: str | os.PathLike, compressed: bool = False, **kwargs: Any
) -> None:
    """``model.save_pretrained`` that leaves either the complete new folder or the old one, never a mix.

    With ``compressed=True`` pruned weights are stored as kept values plus masks (see
    :mod:`hf_hybrid_sparse.serialization`); such a folder needs this package to load. See
    :func:`_atomic_folder` for how the folder is replaced.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if compressed and not hasattr(quantizer, "compressed"):
        raise ValueError(
            "compressed=True needs a model pruned by hf-hybrid-sparse (it has no sparsity state)."
        )

    def write(tmp: Path) -> None:
        if compressed:
            quantizer.compressed = True
        try:
            type(model).save_pretrained(model, tmp, **kwargs)
        finally:
            if compressed:
                quantizer.compressed = False

    _atomic_folder(save_directory, write)


def save_pruned(
    model: Any,
    save_directory: str | os.PathLike,
    tokenizer: Any = None,
    report: dict | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` (with its sparsity state), its tokenizer, the pruning report and ``extra``
    JSON files (``{file name: data}``), all at once: the folder appears complete or not at all."""
    files = dict(extra or {})
    if report is not None:
        files[REPORT_FILE] = report

    def write(tmp: Path) -> None:
        type(model).save_pretrained(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, data in files.items():
            with open(tmp / name, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2)

    return _atomic_folder(save_directory, write)
