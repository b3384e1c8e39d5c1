"""What the loader's checks of a pruned SmolLM2 cost, on the file's mapped weights, one thread.

    python benchmarks/mask_check_probe.py [--rounds 9]

Saves the embedded model pruned hybrid (magnitude) once, then per round and variant maps the file afresh
and times checking all pruned weights: the extension's one-pass check (``csrc/mask_checks.cpp``); the same after asking the kernel to
populate the mappings first (``MADV_POPULATE_READ``, Linux >= 5.14); and the NumPy checks. A second pass
over the same weights gives each variant's work without any first touch of the pages. Variants are interleaved,
the order turned every round; medians with the interquartile range.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import out
from safetensors import safe_open

from hf_hybrid_sparse import HybridSparseConfig, apply_hybrid_sparsity, native, save_pretrained, system
from hf_hybrid_sparse.checkpoint.reader import Checkpoint, verified_state
from hf_hybrid_sparse.models import load_model_and_tokenizer

_MADV_POPULATE_READ = 22


def _populate(weight: torch.Tensor) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    start = weight.data_ptr() // page * page
    length = weight.data_ptr() + weight.numel() * weight.element_size() - start
    if system.libc().madvise(
        ctypes.c_void_p(start), ctypes.c_size_t(length), ctypes.c_int(_MADV_POPULATE_READ)
    ):
        raise SystemExit("madvise(MADV_POPULATE_READ) failed: the kernel is older than 5.14")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not native.available():
        raise SystemExit("the C++ extension could not be built (see the warning above)")
    model, _ = load_model_and_tokenizer()
    apply_hybrid_sparsity(model, HybridSparseConfig(method="magnitude", pattern="hybrid"))
    variants = ("one-pass", "populate + one-pass", "numpy")
    times: dict[str, list[float]] = {v: [] for v in variants}
    again: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, Path(tmp))
        files = [str(f) for f in Path(tmp).glob("*.safetensors")]
        with Checkpoint(files) as ckpt:
            entries = ckpt.doc["modules"]
            masks = {k: ckpt.tensor(e["mask"]).numpy().copy() for k, e in entries.items()}
        for r in range(args.rounds + 1):
            for variant in variants[r % 3 :] + variants[: r % 3]:
                os.environ.pop(native.ENV, None)
                if variant == "numpy":
                    os.environ[native.ENV] = "reference"
                with safe_open(files[0], "pt") as fh:  # a fresh mapping: first touches, as in a load
                    weights = {k: fh.get_tensor(k) for k in entries}
                    start = time.perf_counter()
                    if variant.startswith("populate"):
                        for w in weights.values():
                            _populate(w)
                    for key, entry in entries.items():
                        verified_state(key, entry, None, weights[key], masks[key])
                    first = time.perf_counter()
                    for key, entry in entries.items():  # again, the pages mapped now: the checks' own work
                        verified_state(key, entry, None, weights[key], masks[key])
                    if r:
                        times[variant].append(first - start)
                        again[variant].append(time.perf_counter() - first)
                    del weights
        os.environ.pop(native.ENV, None)
    base = statistics.median(times["one-pass"])
    for variant, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        med = statistics.median(ts)
        out(
            f"{variant}: {med:.4f} s (IQR {q[2] - q[0]:.4f}) for {len(entries)} weights, x{med / base:.2f} one-pass; "
            f"a second pass over the same mapped weights {statistics.median(again[variant]):.4f} s"
        )


if __name__ == "__main__":
    main()
