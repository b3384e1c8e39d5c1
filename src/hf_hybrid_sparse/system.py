"""The operating system's C library, for the few calls Python does not wrap (atomic folder swaps, page
release, heap trimming)."""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The process's C library on Linux, opened once (``None`` elsewhere or when it cannot be opened);
    calls through it set ``errno`` for :func:`ctypes.get_errno`."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
