"""``hf-hybrid-sparse bench``: run a benchmark script of the source checkout's ``benchmarks/`` folder.

Benchmarks are not part of the installed library; from a checkout (``pip install -e .``) this command
runs ``benchmarks/<name>.py`` (default ``kernels``) with the remaining arguments.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from ..errors import HybridSparseError


def benchmarks_folder() -> Path | None:
    """``benchmarks/`` of the source checkout this package runs from, if there is one."""
    folder = Path(__file__).resolve().parents[3] / "benchmarks"
    return folder if folder.is_dir() else None


def run(argv: list[str]) -> int:
    """``bench [NAME] [ARGS...]``: run ``benchmarks/NAME.py ARGS...`` (NAME defaults to ``kernels``)."""
    folder = benchmarks_folder()
    if folder is None:
        raise HybridSparseError(
            "bench runs the scripts in benchmarks/ of a source checkout; clone the repository and "
            "`pip install -e .` to use it."
        )
    name = "kernels"
    if argv and not argv[0].startswith("-"):
        name, argv = argv[0], argv[1:]
    script = folder / f"{name}.py"
    if not script.is_file():
        choices = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
        raise HybridSparseError(f"no benchmark {name!r}; choose one of {', '.join(choices)}.")
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *argv]
    sys.path.insert(0, str(folder))  # as `python benchmarks/NAME.py` would: the scripts share `_common`
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0
