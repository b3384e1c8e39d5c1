"""Saving pruned models atomically: the folder holds the complete old checkpoint or the complete new one.

How a save replaces ``DIR`` (every step is safe to interrupt, even with SIGKILL):

1. Leftovers of interrupted saves are cleaned first: staging folders whose process is gone, and an
   interrupted in-place commit (``DIR/.hf_hybrid_sparse_pending.json``) is completed.
2. The new checkpoint is written into a staging folder beside ``DIR`` (``.DIR.hf-hybrid-sparse-tmp-...``).
3. If ``DIR`` does not exist, the staging folder is renamed to ``DIR``.
4. If it exists, every file in it that the save does not own (a Trainer's ``optimizer.pt``, a README,
   subfolders) is hard-linked into the staging folder (copied where links are impossible), then the two
   folders are swapped in one atomic ``renameat2(RENAME_EXCHANGE)``, and the old folder is removed. User
   files are never moved out of ``DIR``, so no failure can delete them.
5. Where an exchange is impossible -- ``DIR`` is a mount point (a container volume), or the filesystem
   lacks ``RENAME_EXCHANGE`` -- the new files are staged inside ``DIR`` and committed file by file under a
   journal (``DIR/.hf_hybrid_sparse_pending.json``). A commit interrupted there leaves the journal: loading
   with this package refuses the folder until :func:`recover` (or the next save) completes it.

Files a save owns (replaced wholesale, never carried over): model weights and their index, ``config.json``,
``generation_config.json``, and whatever the new save writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import system
from ..errors import StorageError
from ..logs import get_logger

logger = get_logger(__name__)

REPORT_FILE = "hybrid_sparse_report.json"
PENDING_FILE = ".hf_hybrid_sparse_pending.json"
_TAG = "hf-hybrid-sparse"
# files a save_pretrained call owns: replaced wholesale, never carried over from an older save
_MODEL_FILES = re.compile(
    r"^(model|pytorch_model|adapter_model)(-\d{5}-of-\d{5})?(\.[\w-]+)?\.(safetensors|bin)(\.index\.json)?$"
    r"|^(config|generation_config)\.json$"
)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _owner_tag() -> str:
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"
    return f"{host}-{os.getpid()}"


def _staging_name(target: Path, kind: str) -> str:
    return f".{target.name}.{_TAG}-{kind}-{_owner_tag()}-"


def _is_ours_and_dead(name: str) -> bool:
    """Whether a staging folder name belongs to a process of this host that no longer runs."""
    match = re.search(rf"{_TAG}-\w+-([A-Za-z0-9]+)-(\d+)-", name)
    if not match or match.group(1) != _owner_tag().rsplit("-", 1)[0]:
        return False
    pid = int(match.group(2))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _clean_leftovers(target: Path) -> None:
    """Complete an interrupted in-place commit and remove staging folders of dead saves."""
    if (target / PENDING_FILE).exists():
        recover(target)
    places = [(target.parent, f".{target.name}.{_TAG}-")]
    if target.is_dir():
        places.append((target, f".{_TAG}-"))
    for folder, prefix in places:
        for entry in folder.iterdir():
            if entry.name.startswith(prefix) and entry.is_dir() and _is_ours_and_dead(entry.name):
                logger.info(f"removing {entry}, left by an interrupted save")
                shutil.rmtree(entry, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); ``False`` where the system or filesystem cannot."""
    libc = system.libc()
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.EBUSY, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_user_files(target: Path, staging: Path) -> None:
    """Hard-link (or copy) every entry of ``target`` that the new save does not own into ``staging``."""
    for entry in target.iterdir():
        if (staging / entry.name).exists() or _MODEL_FILES.match(entry.name) or _TAG in entry.name:
            continue
        dst = staging / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), dst)
        elif entry.is_dir():
            shutil.copytree(entry, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(dst))


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _commit_in_place(staging: Path, target: Path) -> None:
    """Move the staged files into ``target`` under a journal that :func:`recover` can complete."""
    plan = {
        "staging": str(staging),
        "files": sorted(p.name for p in staging.iterdir()),
        "remove": sorted(
            p.name for p in target.iterdir() if _MODEL_FILES.match(p.name) and not (staging / p.name).exists()
        ),
    }
    _write_json_atomic(target / PENDING_FILE, plan)
    recover(target)


def recover(folder: str | os.PathLike) -> bool:
    """Complete a save that was interrupted while committing files into ``folder`` in place.

    Returns whether there was anything to complete. Safe to call at any time and more than once.
    """
    target = Path(folder)
    pending = target / PENDING_FILE
    if not pending.exists():
        return False
    try:
        plan = json.loads(pending.read_text(encoding="utf-8"))
        staging, files, remove = Path(plan["staging"]), list(plan["files"]), list(plan["remove"])
    except (OSError, ValueError, KeyError, TypeError):
        raise StorageError(f"{pending} is unreadable; remove it and save the model again.") from None
    for name in files:
        src = staging / name
        if src.exists():
            dst = target / name
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            os.replace(src, dst)
    for name in remove:
        with contextlib.suppress(FileNotFoundError):
            (target / name).unlink()
    pending.unlink()
    shutil.rmtree(staging, ignore_errors=True)
    return True


def check_target(save_directory: str | os.PathLike) -> Path:
    """Refuse, before any work, a save target that is a file or whose parent cannot be created or written."""
    target = Path(save_directory).resolve()
    if target.exists() and not target.is_dir():
        raise StorageError(f"{target} exists and is not a directory; choose a folder to save into.")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise StorageError(f"cannot create {target}: {parent} is not a writable folder.")
    if target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
        raise StorageError(f"{target} is not writable.")
    return target


def _atomic_folder(save_directory: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(staging)`` and put the result in place of ``save_directory`` (see the module docstring)."""
    target = check_target(save_directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(target)
    in_place = target.is_dir() and os.path.ismount(target)
    where = target if in_place else target.parent
    staging = Path(
        tempfile.mkdtemp(
            prefix=(f".{_TAG}-stage-{_owner_tag()}-" if in_place else _staging_name(target, "tmp")), dir=where
        )
    )
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; the saved model should look like any other folder
    try:
        write(staging)
        if in_place:
            _commit_in_place(staging, target)
        elif not target.exists():
            os.rename(staging, target)
        else:
            _carry_user_files(target, staging)
            if _exchange(staging, target):
                shutil.rmtree(staging, ignore_errors=True)  # now the old folder
            else:
                _commit_in_place(staging, target)
    except BaseException:
        if not (target / PENDING_FILE).exists():
            shutil.rmtree(staging, ignore_errors=True)  # only new files and links: user files stay in target
        raise
    return target


def save_pretrained(
    model: Any, save_directory: str | os.PathLike, compressed: bool = False, **kwargs: Any
) -> None:
    """``model.save_pretrained`` that leaves either the complete new folder or the old one, never a mix.

    With ``compressed=True`` pruned weights are stored as kept values plus masks (see
    :mod:`hf_hybrid_sparse.checkpoint.format`); such a folder needs this package to load.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if compressed and not hasattr(quantizer, "compressed"):
        raise StorageError(
            "compressed=True needs a model pruned by hf-hybrid-sparse (it has no sparsity state)."
        )

    def write(staging: Path) -> None:
        if compressed:
            quantizer.compressed = True
        try:
            type(model).save_pretrained(model, staging, **kwargs)
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

    def write(staging: Path) -> None:
        type(model).save_pretrained(model, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name, data in files.items():
            with open(staging / name, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2)

    return _atomic_folder(save_directory, write)
