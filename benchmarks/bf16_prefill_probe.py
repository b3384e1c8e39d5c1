"""Why bf16 prefill of the hybrid format stays below dense here: a probe kernel and its inner loops' rates.

    python benchmarks/bf16_prefill_probe.py --json benchmarks/bf16_prefill_probe.json

The shipped kernel runs many tokens by unpacking panels of the weight and calling the BLAS, so in bf16 it
pays the unpacking on top of a dense GEMM that already runs near the vdpbf16ps peak. Beating dense needs a
kernel that skips the pruned products. `csrc/bf16_prefill_probe.cpp` is such a kernel (tokens in the lanes,
x laid out once per call for the 6 possible kept pairs of each group of 4), kept as a probe, not shipped.

Part 1 (`dot_rates`): nanoseconds per zmm vdpbf16ps of each inner loop on L1-resident data, one thread.
Part 2: the probe, the shipped kernel and dense `F.linear` at `--tokens` tokens on the (0.35, 0.45, 0.20)
weights of `kernel_ab.py`, interleaved per round (medians and IQR); and the probe per tier (`mode` bits),
whose differences from its layouts-only run give each tier's share. The probe's result is checked against
the dense product first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import machine, out, write_json
from kernel_ab import _weight

from hf_hybrid_sparse.kernels import cpu

SOURCE = Path(__file__).resolve().parent / "csrc" / "bf16_prefill_probe.cpp"
MODES = {"probe": 15, "layouts": 0, "+DENSE": 9, "+NM": 10, "+TOPK": 12, "tiles, no tier": 8}


def build():
    from torch.utils.cpp_extension import load

    return load(
        name="bf16_prefill_probe",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp", "-std=c++17"],
        extra_ldflags=["-fopenmp"],
    )


def _iqr(v: list[float]) -> float:
    q = statistics.quantiles(v, n=4)
    return q[2] - q[0]


def layer(mod, shape: str, tokens: int, rounds: int, panel: int, cb: int, super_tokens: int) -> dict:
    out_f, in_f = (int(v) for v in shape.split("x"))
    w, packed = _weight(out_f, in_f, torch.bfloat16, "mixed", 0)
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref = F.linear(x.float(), w.float())
    y = mod.prefill(x, packed, out_f, 15, panel, 15, cb, super_tokens)
    err = (y.float() - ref).abs().max().item()
    # bf16 outputs: one rounding of values up to ~300 is ~1; a wrong product is off by far more
    assert err <= 1e-2 * max(1.0, ref.abs().max().item()), f"probe wrong on {shape}: max error {err}"
    cands = {
        "dense F.linear": lambda: F.linear(x, w),
        "shipped hybrid": lambda: cpu.linear(x, packed, None, out_f, 15),
    }
    for name, mode in MODES.items():
        cands[f"probe {name}"] = lambda m=mode: mod.prefill(x, packed, out_f, 15, panel, m, cb, super_tokens)
    times = {k: [] for k in cands}
    for f in cands.values():
        f()
    for r in range(rounds):
        order = list(cands.items())
        for k, f in order if r % 2 == 0 else reversed(order):
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    dense = statistics.median(times["dense F.linear"])
    row = {"shape": shape, "tokens": tokens, "max_abs_error": err}
    for k, v in times.items():
        row[k] = {
            "median_ms": statistics.median(v) * 1e3,
            "iqr_ms": _iqr(v) * 1e3,
            "x_dense": dense / statistics.median(v),
        }
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--panel", type=int, default=4, help="block-rows per panel")
    ap.add_argument("--cb", type=int, default=1 << 20, help="blocks per column chunk (default: no chunks)")
    ap.add_argument("--super_tokens", type=int, default=1 << 20, help="tokens per pass (default: all)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    assert cpu.available(), "the CPU kernel did not build"
    mod = build()
    torch.set_num_threads(1)
    rates = mod.dot_rates(2_000_000)
    out("ns per zmm vdpbf16ps, L1-resident, 1 thread:")
    for name, ns in rates:
        out(f"  {ns:6.3f}  {name}")
    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes.split(","):
        row = layer(mod, shape, args.tokens, args.rounds, args.panel, args.cb, args.super_tokens)
        rows.append(row)
        out(
            f"{shape}, {args.tokens} tokens, {args.threads} threads (probe max error {row['max_abs_error']:.3f}):"
        )
        for k, v in row.items():
            if isinstance(v, dict):
                out(f"  {k:22s} {v['median_ms']:8.2f} ms (IQR {v['iqr_ms']:.2f})  {v['x_dense']:.2f}x dense")
    if args.json:
        write_json(
            args.json, {"setup": vars(args), "machine": machine(), "dot_rates": dict(rates), "rows": rows}
        )


if __name__ == "__main__":
    main()
