"""The CPU kernel of this checkout against the kernel of another git revision, in one process.

    python benchmarks/kernel_ab.py --rev HEAD~1
    python benchmarks/kernel_ab.py --rev 1f1d22c --shapes 4096x4096 --tokens 16 --tiers nm --threads 1

Run-to-run noise on a shared 2-core machine is larger than most kernel changes, and two builds of the op
cannot share its namespace: this builds `csrc/hybrid_cpu.cpp` as it was at `--rev` under the namespace
`hs_ab`, then times that kernel, this checkout's kernel and dense `F.linear` interleaved call by call on
the same packed weights, each call on the next of enough copies to exceed the L3 cache several times (so
no candidate finds another's weights cached), and prints medians with the interquartile range. Both kernels must agree with the dense product (checked first, every case).
Tiers: the (0.35, 0.45, 0.20) hybrid of `cpu_kernels.py` (`mixed`), or a whole layer in one tier
(`dense`, `nm`, `topk`) to see one method alone.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from _common import machine, out, write_json

from hf_hybrid_sparse.kernels import cpu
from hf_hybrid_sparse.kernels.packing import FIELDS, pack
from hf_hybrid_sparse.pruning.patterns import DENSE, NM, TOPK, assign_tiers, block_scores, hybrid_mask

SOURCE = "src/hf_hybrid_sparse/csrc/hybrid_cpu.cpp"
L3_BYTES = 32 << 20


def build_revision(rev: str) -> None:
    """Compile the kernel source of `rev` as the op namespace `hs_ab`."""
    from torch.utils.cpp_extension import load

    root = Path(__file__).resolve().parent.parent
    text = subprocess.run(
        ["git", "show", f"{rev}:{SOURCE}"], cwd=root, check=True, capture_output=True, text=True
    ).stdout
    for macro in ("TORCH_LIBRARY(", "TORCH_LIBRARY_IMPL("):
        text = text.replace(macro + "hf_hybrid_sparse", macro + "hs_ab")
    sha = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=root, check=True, capture_output=True, text=True
    ).stdout.strip()
    path = Path(tempfile.gettempdir()) / f"hs_ab_{sha}.cpp"
    path.write_text(text)
    load(
        name=f"hs_ab_{sha}",
        sources=[str(path)],
        extra_cflags=["-O3", "-march=native", "-fopenmp", "-std=c++17"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
    )


def _weight(out_f: int, in_f: int, dtype: torch.dtype, tiers: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    if tiers == "mixed":
        tmap = assign_tiers(block_scores(w.abs(), 16), (0.35, 0.45, 0.20), "layer")
    else:
        code = {"dense": DENSE, "nm": NM, "topk": TOPK}[tiers]
        tmap = torch.full((out_f // 16, in_f // 16), code, dtype=torch.int8)
    mask = hybrid_mask(w.abs(), tmap, 16, 2, 4, 15)
    w = (w * mask).to(dtype)
    return w, [pack(w, mask, tmap, 15).tensors[f] for f in FIELDS]


def _check(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, who: str) -> None:
    # a guard against wrong results (off by O(1)), not a precision test: fp32 sums over 11008 inputs in
    # another order differ by ~2e-6 of the output scale, so the bound is 1e-5
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    err = (y.float() - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), f"{who}: max error {err}"


def compare(shapes, tokens, dtypes, tiers: str, rounds: int) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for out_f, in_f in shapes:
            nbytes = out_f * in_f * dtype.itemsize
            weights = [
                _weight(out_f, in_f, dtype, tiers, s) for s in range(max(3, int(4 * L3_BYTES / nbytes) + 1))
            ]
            for n in tokens:
                x = torch.randn(n, in_f, generator=torch.Generator().manual_seed(n)).to(dtype)
                calls = {
                    "rev": lambda t, w: torch.ops.hs_ab.hybrid_linear(x, t, None, out_f, 15),
                    "this": lambda t, w: cpu.linear(x, t, None, out_f, 15),
                    "dense": lambda t, w: torch.nn.functional.linear(x, w),
                }
                ref = torch.nn.functional.linear(x.float(), weights[0][0].float())
                _check(calls["rev"](weights[0][1], None), ref, dtype, "rev")
                _check(calls["this"](weights[0][1], None), ref, dtype, "this")
                # every call takes the next weight copy: two candidates on one copy back to back would let
                # the second find the first's weights in the cache (an A/A run of identical kernels read
                # 1.2-3.9x "faster" for the second on small layers that way)
                times: dict[str, list[float]] = {k: [] for k in calls}
                k = 0
                names = list(calls)
                for r in range(rounds + 1):
                    order = names if r % 2 else names[::-1]  # alternate who goes first
                    for _ in weights:
                        for name in order:
                            call = calls[name]
                            w, t = weights[k % len(weights)]
                            k += 1
                            t0 = time.perf_counter()
                            call(t, w)
                            if r:  # the first round warms up
                                times[name].append(time.perf_counter() - t0)
                stat = {}
                for name, v in times.items():
                    q = statistics.quantiles(v, n=4)
                    stat[name] = {"median_ms": statistics.median(v) * 1e3, "iqr_ms": (q[2] - q[0]) * 1e3}
                row = {"dtype": str(dtype)[6:], "shape": f"{out_f}x{in_f}", "tokens": n, **stat}
                row["this_x_rev"] = stat["rev"]["median_ms"] / stat["this"]["median_ms"]
                row["this_x_dense"] = stat["dense"]["median_ms"] / stat["this"]["median_ms"]
                row["rev_x_dense"] = stat["dense"]["median_ms"] / stat["rev"]["median_ms"]
                rows.append(row)
                out(
                    f"{row['dtype']:9s} {row['shape']:>11s} {n:3d} tok  rev {stat['rev']['median_ms']:.3f} "
                    f"this {stat['this']['median_ms']:.3f} dense {stat['dense']['median_ms']:.3f} ms  "
                    f"this/rev x{row['this_x_rev']:.2f}  x dense: this {row['this_x_dense']:.2f} "
                    f"rev {row['rev_x_dense']:.2f}"
                )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", required=True, help="git revision whose kernel to compare against")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,576x576,1536x576,576x1536")
    ap.add_argument("--tokens", default="1,4,8,16")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--tiers", default="mixed", choices=["mixed", "dense", "nm", "topk"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    assert cpu.available(), "the CPU kernel did not build"
    build_revision(args.rev)
    torch.set_num_threads(args.threads)
    out(f"machine: {machine()}")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    rows = compare(shapes, [int(t) for t in args.tokens.split(",")], dtypes, args.tiers, args.rounds)
    if args.json:
        write_json(args.json, {"setup": vars(args), "machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
