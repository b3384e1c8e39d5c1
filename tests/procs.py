"""Environment for tests that run Python in a subprocess."""

import os
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


def subprocess_env(**extra: str) -> dict[str, str]:
    """``os.environ`` plus ``extra``, with the tests folder and ``src/`` added to (not replacing) PYTHONPATH,
    so a subprocess finds the helpers and the package whether or not the package is installed."""
    paths = [str(TESTS), str(SRC)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, **extra, PYTHONPATH=os.pathsep.join(paths))
