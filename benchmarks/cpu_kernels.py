"""The CPU kernel against dense `F.linear` and torch's CSR / BSR(16), per layer and end to end.

    python benchmarks/cpu_kernels.py                      # everything (about 20 minutes on 2 cores)
    python benchmarks/cpu_kernels.py --parts layers --shapes 4096x4096 --tokens 1,16
    python benchmarks/cpu_kernels.py --parts e2e --models smollm2

Layers: Llama-2-7B shapes (4096x4096, 11008x4096, 4096x11008) and SmolLM2-135M shapes, hybrid tiers
(0.35, 0.45, 0.20) with 15/256 TOPK, for 1 / 4 / 16 / 512 tokens, fp32 and bf16. In one process, the
candidates interleaved round by round; every call uses the next of enough weight copies that together they
exceed the L3 cache several times, so no candidate finds its weight cached. Medians with the interquartile
range. Above 16 tokens `hybrid_panels` times the kernel's other prefill path (unpacked panels and the
BLAS) beside the default block-sparse tiles. End to end: greedy `generate` (128 new tokens after a
32-token prompt) of SmolLM2 and of a 4-layer Llama-2-7B-shaped model with random weights, dense vs hybrid-pruned (magnitude) and converted,
alternating; tokens/s, the bytes of the linear weights, and the process's resident memory.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from _common import machine, out, random_llama, write_json

from hf_hybrid_sparse import (
    HybridSparseConfig,
    apply_hybrid_sparsity,
    convert_to_dense,
    convert_to_hybrid_kernels,
)
from hf_hybrid_sparse.kernels import cpu
from hf_hybrid_sparse.kernels.packing import FIELDS, pack
from hf_hybrid_sparse.pruning.patterns import assign_tiers, block_scores, hybrid_mask

SHAPES = {
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
}
L3_BYTES = 32 << 20


def _hybrid(out_f: int, in_f: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    tiers = assign_tiers(block_scores(w.abs(), 16), (0.35, 0.45, 0.20), "layer")
    mask = hybrid_mask(w.abs(), tiers, 16, 2, 4, 15)
    w = (w * mask).to(dtype)
    return w, [pack(w, mask, tiers, 15).tensors[f] for f in FIELDS]


def _panels(x: torch.Tensor, tensors: list[torch.Tensor], out_f: int) -> torch.Tensor:
    before = torch.ops.hf_hybrid_sparse.set_prefill(1)
    try:
        return cpu.linear(x, tensors, None, out_f, 15)
    finally:
        torch.ops.hf_hybrid_sparse.set_prefill(*before)


def _candidates(w: torch.Tensor, tensors: list[torch.Tensor]):
    """name -> (object holding the weight, call(x))"""
    out_f = w.shape[0]
    cands = {
        "dense": lambda x, w=w: torch.nn.functional.linear(x, w),
        "hybrid": lambda x, t=tensors: cpu.linear(x, t, None, out_f, 15),
        # prefill's other path (unpacked panels and the BLAS, the only one before the block-sparse tiles)
        "hybrid_panels": lambda x, t=tensors: _panels(x, t, out_f),
    }
    for name, make in (("csr", lambda: w.to_sparse_csr()), ("bsr16", lambda: w.to_sparse_bsr((16, 16)))):
        try:
            sw = make()
            torch.mm(sw, torch.zeros(w.shape[1], 1, dtype=w.dtype))
            cands[name] = lambda x, sw=sw: torch.mm(sw, x.t()).t()
        except (RuntimeError, NotImplementedError):
            pass
    return cands


def layer_table(shapes, tokens, dtypes, rounds) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for out_f, in_f in shapes:
            nbytes = out_f * in_f * torch.finfo(dtype).bits // 8
            copies = max(3, int(4 * L3_BYTES / nbytes) + 1)
            weights = [_hybrid(out_f, in_f, dtype, s) for s in range(copies)]
            per_copy = [_candidates(w, t) for w, t in weights]
            names = list(per_copy[0])
            for t in tokens:
                x = torch.randn(t, in_f).to(dtype)
                reps = rounds if t <= 16 else max(3, rounds // 5)
                times = {n: [] for n in names}
                k = 0
                for r in range(reps + 1):
                    for n in names:
                        if n not in per_copy[k % copies] or (n == "hybrid_panels" and t <= 16):
                            continue  # (below 17 tokens there is one path)
                        fn = per_copy[k % copies][n]
                        k += 1
                        start = time.perf_counter()
                        fn(x)
                        if r:  # the first round warms up
                            times[n].append(time.perf_counter() - start)
                row = {"dtype": str(dtype).replace("torch.", ""), "shape": f"{out_f}x{in_f}", "tokens": t}
                for n, ts in times.items():
                    if ts:
                        q = statistics.quantiles(ts, n=4) if len(ts) > 2 else [min(ts), 0, max(ts)]
                        row[n] = {"median_ms": 1e3 * statistics.median(ts), "iqr_ms": 1e3 * (q[2] - q[0])}
                for n in names:
                    if n != "dense" and n in row:
                        row[n]["x_dense"] = row["dense"]["median_ms"] / row[n]["median_ms"]
                rows.append(row)
                cells = " ".join(
                    f"{n} {row[n]['median_ms']:.3f}ms"
                    + (f" x{row[n]['x_dense']:.2f}" if n != "dense" else "")
                    for n in names
                    if n in row
                )
                out(f"{row['dtype']:8s} {row['shape']:>11s} {t:4d} tok  {cells}")
            del weights, per_copy
            gc.collect()
    return rows


def _rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _linear_bytes(model) -> int:
    from hf_hybrid_sparse.kernels.linear import HybridSparseLinear

    total = 0
    for m in model.modules():
        if isinstance(m, HybridSparseLinear):
            total += m.nbytes()
        elif isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings():
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total


def _tokens_per_s(model, prompt, new_tokens: int) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(
            input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
        return new_tokens / (time.perf_counter() - start)


def _load(name: str, dtype: torch.dtype):
    if name == "smollm2":
        from hf_hybrid_sparse.models import load_model_and_tokenizer

        return load_model_and_tokenizer(dtype=dtype)[0].eval()
    return random_llama("llama2-7b-4layer", "cpu", dtype)


def rss_probe(spec: str) -> None:
    """(in a fresh process) ``from_pretrained`` a saved folder -- packed on load when ``kernels`` --, answer
    one 8-token prompt, and print the resident memory then and its peak.

    The forward matters: a dense load only maps the safetensors files, so before it the weights are not
    resident yet (an earlier version of this probe measured exactly that).
    """
    from transformers import AutoModelForCausalLM

    folder, dtype, kind = spec.split(",")
    extra = {"quantization_config": HybridSparseConfig(use_kernels=True)} if kind == "kernels" else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **extra)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long))
    gc.collect()
    out(f"RSS {_rss_mib():.1f} PEAK {_rss_mib('VmHWM'):.1f} {sum(1 for _ in model.modules())}")


def e2e(name: str, dtype: torch.dtype, new_tokens: int, rounds: int) -> dict:
    dense = _load(name, dtype)
    vocab = dense.config.vocab_size
    hybrid = copy.deepcopy(dense)
    apply_hybrid_sparsity(hybrid, HybridSparseConfig(method="magnitude", pattern="hybrid"))
    report = convert_to_hybrid_kernels(hybrid)
    prompt = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0))
    _tokens_per_s(dense, prompt, 4)
    _tokens_per_s(hybrid, prompt, 4)
    speeds = {"dense": [], "hybrid": []}
    for _ in range(rounds):
        for label, model in (("dense", dense), ("hybrid", hybrid)):
            speeds[label].append(_tokens_per_s(model, prompt, new_tokens))
    result = {
        "model": name,
        "dtype": str(dtype).replace("torch.", ""),
        "new_tokens": new_tokens,
        "dense_tok_s": statistics.median(speeds["dense"]),
        "hybrid_tok_s": statistics.median(speeds["hybrid"]),
        "dense_runs": speeds["dense"],
        "hybrid_runs": speeds["hybrid"],
        "linear_bytes_dense": _linear_bytes(dense),
        "linear_bytes_hybrid": _linear_bytes(hybrid),
        "converted_bytes_ratio": report.ratio,
    }
    result["x_dense"] = result["hybrid_tok_s"] / result["dense_tok_s"]
    result["linear_bytes_ratio"] = result["linear_bytes_hybrid"] / result["linear_bytes_dense"]
    with tempfile.TemporaryDirectory() as tmp:
        # resident memory of a fresh process that loads the saved model: dense, or packed layer by layer
        dense.save_pretrained(f"{tmp}/dense")
        convert_to_dense(hybrid)
        hybrid.save_pretrained(f"{tmp}/pruned")
        del hybrid, dense
        gc.collect()
        for kind, folder in (("dense", "dense"), ("hybrid", "pruned")):
            probe = subprocess.run(
                [sys.executable, __file__, "--rss_probe", f"{tmp}/{folder},{result['dtype']},{kind if kind == 'dense' else 'kernels'}"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            result[f"rss_mib_{kind}"] = float(probe.stdout.split("RSS")[-1].split()[0])
            result[f"peak_rss_mib_{kind}"] = float(probe.stdout.split("PEAK")[-1].split()[0])
    out(
        f"e2e {name} {result['dtype']}: dense {result['dense_tok_s']:.2f} tok/s, hybrid {result['hybrid_tok_s']:.2f} "
        f"tok/s, x{result['x_dense']:.2f}; linear weights {result['linear_bytes_ratio']:.3f}x; "
        f"RSS after a first forward {result['rss_mib_dense']:.0f} -> {result['rss_mib_hybrid']:.0f} MiB "
        f"(peak {result['peak_rss_mib_dense']:.0f} -> {result['peak_rss_mib_hybrid']:.0f})"
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="layers,e2e")
    ap.add_argument("--shapes", default="llama2-7b,smollm2", help="shape sets or OUTxIN,...")
    ap.add_argument("--tokens", default="1,4,16,512")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--models", default="llama2-7b-4layer,smollm2")
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--e2e_rounds", type=int, default=3)
    ap.add_argument("--json", default="benchmarks/cpu_kernels.json")
    ap.add_argument("--rss_probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_probe:
        return rss_probe(args.rss_probe)
    assert cpu.available(), "the CPU kernel did not build"
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    shapes = []
    for s in args.shapes.split(","):
        shapes += SHAPES.get(s, [tuple(int(v) for v in s.split("x"))] if "x" in s else [])
    results: dict = {"setup": vars(args), "threads": torch.get_num_threads()}
    out(f"machine: {machine()}")
    if "layers" in args.parts:
        results["layers"] = layer_table(shapes, [int(t) for t in args.tokens.split(",")], dtypes, args.rounds)
    if "e2e" in args.parts:
        results["e2e"] = [
            e2e(name, dtype, args.new_tokens, args.e2e_rounds)
            for name in args.models.split(",")
            for dtype in dtypes
        ]
    write_json(args.json, results)


if __name__ == "__main__":
    main()
