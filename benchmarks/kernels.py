"""Hybrid packed kernels vs dense cuBLAS and torch 2:4 (Llama-2-7B shapes), packed size, e2e generate.

    python benchmarks/kernels.py [--e2e llama2-7b|tiny]   # or: hf-hybrid-sparse bench kernels [...]

Per shape (4096x4096, 11008x4096, 4096x11008) and token count (1, 4, 16, 128, 2048), fp16, tiers
(0.35, 0.45, 0.20) with 15/256 TOPK: median time (triton.testing.do_bench over rotating weight copies so
the L2 cannot hold them) of dense `F.linear` (cuBLAS), `to_sparse_semi_structured` 2:4 (where the GPU
supports it) and the hybrid layer, the speed-up against dense, and achieved bandwidth against the
card's copy bandwidth measured in the same run. Then `--e2e`: tokens/s of greedy `generate` on a random
Llama-2-7B-shaped model (fp16, hybrid-pruned by magnitude), dense layers vs converted HybridSparseLinear
(`--e2e tiny` runs the same code on a tiny model, on CPU too). Never run on a GPU in this repository so
far: no GPU was available.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import out as _out
from _common import random_llama

from hf_hybrid_sparse.kernels.packing import dense_fp16_bytes, pack

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = [1, 4, 16, 128, 2048]


def hybrid_weight(out_f: int, in_f: int, seed: int = 0):
    from hf_hybrid_sparse.pruning.patterns import assign_tiers, block_scores, hybrid_mask

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float32)
    tiers = assign_tiers(block_scores(w.abs(), 16), (0.35, 0.45, 0.20), "layer")
    mask = hybrid_mask(w.abs(), tiers, 16, 2, 4, 15)
    return (w * mask).half(), mask, tiers


def size_table() -> None:
    _out("| shape | dense fp16 MiB | packed MiB | ratio |\n|---|---:|---:|---:|")
    for out_f, in_f in SHAPES:
        w, mask, tiers = hybrid_weight(out_f, in_f)
        p = pack(w, mask, tiers, 15)
        d = dense_fp16_bytes(out_f, in_f)
        _out(f"| {out_f}x{in_f} | {d / 2**20:.1f} | {p.nbytes() / 2**20:.1f} | {p.nbytes() / d:.3f} |")


def gpu_tables(copies: int) -> None:
    import triton.testing as tt

    from hf_hybrid_sparse.kernels.triton_decode import decode

    dev = "cuda"
    buf = torch.empty(2**30, dtype=torch.uint8, device=dev)
    ms = tt.do_bench(lambda: buf.clone(), return_mode="median")
    copy_bw = 2 * buf.numel() / (ms * 1e-3)  # read + write
    _out(f"device: {torch.cuda.get_device_name()}, copy bandwidth {copy_bw / 1e12:.2f} TB/s\n")
    _out("| shape | tokens | dense us | 2:4 us | hybrid us | hybrid x dense | hybrid GB/s (% copy) |")
    _out("|---|---:|---:|---:|---:|---:|---:|")
    for out_f, in_f in SHAPES:
        w, mask, tiers = hybrid_weight(out_f, in_f)
        dense_w = [w.to(dev).clone() for _ in range(copies)]
        packed = [pack(w, mask, tiers, 15).to(dev) for _ in range(copies)]
        try:
            from torch.sparse import to_sparse_semi_structured

            from hf_hybrid_sparse.pruning.patterns import nm_mask

            w24 = (w.float() * nm_mask(w.float().abs(), 2, 4)).half()
            semi = [to_sparse_semi_structured(w24.to(dev)) for _ in range(min(copies, 4))]
        except Exception as exc:  # noqa: BLE001 - reported in the table
            semi, why = None, type(exc).__name__
        for t in TOKENS:
            x = torch.randn(t, in_f, device=dev, dtype=torch.float16)
            i = [0]

            def rot(seq):
                i[0] = (i[0] + 1) % len(seq)
                return seq[i[0]]

            d_ms = tt.do_bench(lambda: torch.nn.functional.linear(x, rot(dense_w)), return_mode="median")
            s_ms = None
            if semi is not None:
                try:
                    s_ms = tt.do_bench(lambda: torch.nn.functional.linear(x, rot(semi)), return_mode="median")
                except Exception as exc:  # noqa: BLE001
                    why = type(exc).__name__
            if t <= 16:
                h_ms = tt.do_bench(lambda: decode(x, rot(packed)), return_mode="median")
                gbs = packed[0].nbytes() / (h_ms * 1e-3) / 1e9
                bw = f"{gbs:.0f} ({100 * gbs * 1e9 / copy_bw:.0f}%)"
            else:
                dense_cached = [torch.empty_like(w, device=dev) for _ in range(copies)]
                h_ms = tt.do_bench(
                    lambda: torch.nn.functional.linear(x, rot(dense_cached)), return_mode="median"
                )
                bw = "dense GEMM path"
            s_txt = f"{1e3 * s_ms:.1f}" if s_ms is not None else f"n/a ({why})"
            _out(
                f"| {out_f}x{in_f} | {t} | {1e3 * d_ms:.1f} | {s_txt} | {1e3 * h_ms:.1f} | {d_ms / h_ms:.2f} | {bw} |"
            )


def e2e(shape: str, new_tokens: int) -> None:
    """Greedy generate tokens/s, dense vs packed hybrid layers, same model and prompt."""
    import time

    from hf_hybrid_sparse import HybridSparseConfig, apply_hybrid_sparsity, convert_to_hybrid_kernels

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_llama({"llama2-7b": "llama2-7b-shape", "tiny": "e2e-tiny"}[shape], dev)
    apply_hybrid_sparsity(model, HybridSparseConfig(method="magnitude", pattern="hybrid"))
    prompt = torch.randint(0, 32000, (1, 32), device=dev)

    def tokens_per_s() -> float:
        model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)  # warm-up / compile
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(
            input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
        if dev == "cuda":
            torch.cuda.synchronize()
        return new_tokens / (time.perf_counter() - t0)

    dense = tokens_per_s()
    convert_to_hybrid_kernels(model)
    hybrid = tokens_per_s()
    where = torch.cuda.get_device_name() if dev == "cuda" else "CPU (reference path: no speed-up expected)"
    _out(
        f"\ne2e generate ({shape}, {new_tokens} new tokens, {where}): dense {dense:.1f} tok/s, "
        f"hybrid {hybrid:.1f} tok/s, x{hybrid / dense:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    """Print the packed-size table, GPU timings when CUDA is present, and optionally the e2e comparison."""
    ap = argparse.ArgumentParser(prog="hf-hybrid-sparse bench")
    ap.add_argument("--copies", type=int, default=8, help="rotating weight copies (> L2 size in total)")
    ap.add_argument("--e2e", choices=["llama2-7b", "tiny"], default=None)
    ap.add_argument("--new_tokens", type=int, default=128)
    args = ap.parse_args(argv)
    size_table()
    if torch.cuda.is_available():
        gpu_tables(args.copies)
    else:
        _out("\nGPU timings: not measured (no CUDA device on this machine).")
    if args.e2e:
        e2e(args.e2e, args.new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
