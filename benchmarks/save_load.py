"""`save_pretrained` / `from_pretrained` of a pruned SmolLM2-135M against the same model saved dense.

    python benchmarks/save_load.py [--rounds 7] [--threads 1]

Three folders of the same weights: dense (no sparsity state), hybrid-pruned in the plain layout, and the
compressed layout. Each round saves and loads every one of them (interleaved, page cache warm after the
first round, the order turned every round); medians with the spread. Each save goes to a new folder (the previous one is removed
untimed), so that dense and hybrid saves do the same file work. Every check the loader makes stays on (digests, masks against
weights, tier maps), so the ratio is the price of the sparsity state. A dense load only maps the files
(the weights are read when first used) while the checks read every pruned weight, so each load is also
timed up to the end of a first 16-token forward ("load+forward"): the time until the model has answered.
"prepare" times what a save computes before it writes (the state dict with masks, checks and header),
the package's own part of a save: writing the files varies with the machine's memory far more.
Saves and loads check through the C++ extension's one-pass check (built first if needed); each round
also prepares and loads the hybrid model once more with the NumPy checks
(``HF_HYBRID_SPARSE_KERNEL=reference``), as "hybrid-numpy".
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import out, write_json
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from hf_hybrid_sparse import HybridSparseConfig, apply_hybrid_sparsity, native, save_pretrained
from hf_hybrid_sparse.models import load_model_and_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default="benchmarks/save_load.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit(
            "the C++ extension could not be built (see the warning above); the loader's checks need it"
        )
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dense, _ = load_model_and_tokenizer()
    pruned = copy.deepcopy(dense)
    apply_hybrid_sparsity(pruned, HybridSparseConfig(method="magnitude", pattern="hybrid"))
    with tempfile.TemporaryDirectory() as tmp:
        folders = {k: Path(tmp) / k for k in ("dense", "hybrid", "compressed")}

        def save(kind: str) -> None:
            if kind == "dense":
                dense.save_pretrained(folders[kind])
            else:
                save_pretrained(pruned, folders[kind], compressed=kind == "compressed")

        def prepare(kind: str) -> None:
            """What a save computes before writing: the package's part, free of the file system's luck."""
            if kind == "dense":
                dense.state_dict()
                return
            quantizer = pruned.hf_quantizer
            quantizer.compressed = kind == "compressed"
            try:
                quantizer.get_state_dict_and_metadata(pruned)
            finally:
                quantizer.compressed = False

        ops = ("prepare", "save", "load", "load+forward")
        times: dict[str, list[float]] = {f"{op} {k}": [] for op in ops for k in folders}
        times |= {f"{op} hybrid-numpy": [] for op in ("prepare", "load", "load+forward")}
        ids = torch.randint(0, dense.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))

        def load(folder: Path) -> tuple[float, float]:
            """Seconds to the loaded model and to the end of its first forward."""
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(folder)
            loaded = time.perf_counter() - start
            with torch.no_grad():
                model(ids)
            return loaded, time.perf_counter() - start

        for r in range(args.rounds + 1):
            kinds = list(folders)
            # the order turns every round: a save's time depends on the memory the one before freed (on this
            # VM first touches of memory measured 1.7-2.6 ns/byte, reused pages ~0.1), so no kind may always
            # follow the same one
            for kind in kinds[r % 3 :] + kinds[: r % 3]:
                # every save writes a new folder: replacing one also pays for dropping the old files from
                # the page cache, which made the dense baseline (written in place) vary 0.13-0.9 s
                shutil.rmtree(folders[kind], ignore_errors=True)
                start = time.perf_counter()
                prepare(kind)
                prepared = time.perf_counter() - start
                start = time.perf_counter()
                save(kind)
                saved = time.perf_counter() - start
                loaded, answered = load(folders[kind])
                if r:  # round 0 warms the page cache and the imports
                    times[f"prepare {kind}"].append(prepared)
                    times[f"save {kind}"].append(saved)
                    times[f"load {kind}"].append(loaded)
                    times[f"load+forward {kind}"].append(answered)
                if kind == "hybrid":
                    os.environ[native.ENV] = "reference"
                    try:
                        start = time.perf_counter()
                        prepare(kind)
                        prepared = time.perf_counter() - start
                        loaded, answered = load(folders[kind])
                    finally:
                        del os.environ[native.ENV]
                    if r:
                        times["prepare hybrid-numpy"].append(prepared)
                        times["load hybrid-numpy"].append(loaded)
                        times["load+forward hybrid-numpy"].append(answered)
    results = {"setup": vars(args) | {"threads": torch.get_num_threads()}, "seconds": {}}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        results["seconds"][name] = {"median": statistics.median(ts), "iqr": q[2] - q[0]}
    for op in ops:
        base = results["seconds"][f"{op} dense"]["median"]
        for kind in ("hybrid", "hybrid-numpy", "compressed"):
            if f"{op} {kind}" not in results["seconds"]:
                continue
            entry = results["seconds"][f"{op} {kind}"]
            entry["x_dense"] = entry["median"] / base
            out(
                f"{op} {kind}: {entry['median']:.3f} s (IQR {entry['iqr']:.3f}) vs dense {base:.3f} s: x{entry['x_dense']:.2f}"
            )
    write_json(args.json, results)


if __name__ == "__main__":
    main()
