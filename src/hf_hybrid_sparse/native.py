"""The package's C++ extension (``csrc/*.cpp``): built on first use, registered as torch custom ops.

Ops: ``hybrid_linear`` / ``hybrid_unpack`` (the packed format's CPU kernel, used by :mod:`.kernels`),
``sparsegpt_chunk`` (the sequential part of SparseGPT's column loop, used by :mod:`.pruning.sparsegpt`) and
``check_mask`` (``csrc/mask_checks.cpp``: a loaded checkpoint's mask checks in one pass, used by
:mod:`.checkpoint.reader` when the extension is :func:`ready`). It is compiled with
``torch.utils.cpp_extension`` the first time it is needed (about a minute) into torch's extension cache
(``TORCH_EXTENSIONS_DIR``), one build per CPU type; later processes load it in milliseconds.

Set ``HF_HYBRID_SPARSE_KERNEL=reference`` to never build or use it; without a compiler (or when the build
fails) one warning says so and everything falls back to pure PyTorch (slower, same results).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from pathlib import Path

import torch

from .logs import get_logger

logger = get_logger(__name__)

SOURCES = tuple(Path(__file__).with_name("csrc") / f for f in ("hybrid_cpu.cpp", "mask_checks.cpp"))
ENV = "HF_HYBRID_SPARSE_KERNEL"
#: compiler flags selecting the instruction set (default: this CPU's); e.g. "-march=x86-64-v3" builds the
#: AVX2 variant (the portable loops), which the tests use to check that path on an AVX-512 machine
ARCH_ENV = "HF_HYBRID_SPARSE_CPU_ARCH"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _arch_flags() -> list[str]:
    return os.environ.get(ARCH_ENV, "-march=native").split()


def _cpu_fingerprint() -> str:
    """What the build depends on: the sources, torch, Python, the flags and the CPU's instruction sets."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((ln for ln in fh if ln.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    digest = hashlib.sha256()
    for part in (
        *(s.read_bytes() for s in SOURCES),
        torch.__version__.encode(),
        platform.python_version().encode(),
        " ".join(_arch_flags()).encode(),
        flags.encode(),
        platform.machine().encode(),
    ):
        digest.update(part)
    return digest.hexdigest()[:12]


@functools.cache
def _name() -> str:
    return f"hf_hybrid_sparse_cpu_{_cpu_fingerprint()}"


def _build_directory() -> Path:
    """Where this CPU's build lives: our own folder under torch's extension root, so that :func:`ready` can
    tell a finished build from none without compiling."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    return Path(root) / "hf_hybrid_sparse" / _name()


@functools.cache
def load() -> bool:
    """Build (first time) and load the extension; ``False`` (with one warning) where that is impossible."""
    if os.environ.get(ENV, "auto") == "reference":
        return False
    if hasattr(torch.ops.hf_hybrid_sparse, "hybrid_linear"):
        return True
    try:
        from torch.utils.cpp_extension import load as build

        directory = _build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        build(
            name=_name(),
            sources=[str(s) for s in SOURCES],
            build_directory=str(directory),
            extra_cflags=["-O3", *_arch_flags(), "-fopenmp", "-std=c++17"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - no compiler, failed build: the reference path still works
        logger.warning(
            f"hf-hybrid-sparse: the CPU kernel could not be built ({type(exc).__name__}: {str(exc)[:300]}); "
            "HybridSparseLinear and SparseGPT use slower pure-PyTorch paths. Install a C++ compiler (g++) to get it."
        )
        return False
    _register_fake()
    return True


def _register_fake() -> None:
    """Shapes for torch.compile / meta tensors: y is [tokens, out_features] in x's dtype."""
    try:
        torch.library.register_fake("hf_hybrid_sparse::hybrid_linear")(
            lambda x, packed, bias, out_features, topk: x.new_empty((x.shape[0], out_features))
        )
        torch.library.register_fake("hf_hybrid_sparse::hybrid_unpack")(
            lambda packed, out_features, in_features, topk: packed[0].new_empty((out_features, in_features))
        )
    except RuntimeError:  # registered already (a second load in the same process)
        pass


def available() -> bool:
    """Whether the extension is usable in this process (builds it on first call)."""
    return load()


def ready() -> bool:
    """Whether the extension is usable without compiling: loaded already, or built earlier on this CPU.

    For work that is quick without it (checking a checkpoint while it loads), where a first-use build of
    about a minute would cost far more than it saves.
    """
    if os.environ.get(ENV, "auto") == "reference":
        return False
    if load.cache_info().currsize or hasattr(torch.ops.hf_hybrid_sparse, "hybrid_linear"):
        return load()
    return (_build_directory() / f"{_name()}.so").exists() and load()
