"""Saving a pruned model atomically: write into a temporary sibling folder, then rename it into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

REPORT_FILE = "hybrid_sparse_report.json"


def save_pruned(
    model: Any, save_directory: str | os.PathLike, tokenizer: Any = None, report: dict | None = None
) -> Path:
    """Save ``model`` (pruned weights are zeros), its tokenizer and the pruning report to ``save_directory``.

    The folder appears complete or not at all: everything is written to a temporary folder next to
    it, which replaces ``save_directory`` only after every file is written. An existing folder is
    moved aside first and removed only after the new one is in place.
    """
    target = Path(save_directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the saved model should look like any other folder
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            with open(tmp / REPORT_FILE, "w", encoding="utf-8") as fh:
                json.dump(report, fh, indent=2)
        backup = None
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, backup / target.name)
        os.replace(tmp, target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
