"""Perplexity of the embedded SmolLM2-135M after one-shot pruning, every method x pattern.

    python benchmarks/smollm2_quality.py [--nsamples 32 --seqlen 512 --eval_windows 24] [--out results.json]

Calibration: the offline Wikipedia corpus (train split); evaluation: its test split, non-overlapping
windows of `seqlen`. Each configuration prunes a fresh copy of the dense model. Results are appended
to the JSON file as they finish (a rerun skips what is already there) and printed as a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from hf_hybrid_sparse import HybridSparseConfig, apply_hybrid_sparsity, perplexity
from hf_hybrid_sparse.models import load_model_and_tokenizer

PATTERNS = [
    ("unstructured 50%", dict(pattern="unstructured", sparsity=0.5)),
    ("2:4", dict(pattern="2:4")),
    ("4:8", dict(pattern="4:8")),
    ("hybrid (0.35,0.45,0.20) layer", dict(pattern="hybrid", tier_group="layer")),
    ("hybrid (0.35,0.45,0.20) row", dict(pattern="hybrid", tier_group="row")),
]
METHODS = ["magnitude", "wanda", "sparsegpt"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval_windows", type=int, default=24)
    ap.add_argument("--out", default="benchmarks/smollm2_quality.json")
    args = ap.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    model, tok = load_model_and_tokenizer()

    def ppl(m):
        return perplexity(m, tok, "wiki_offline", seqlen=args.seqlen, max_windows=args.eval_windows)

    def save():
        out.write_text(json.dumps(results, indent=2))

    if "dense" not in results:
        res = ppl(model)
        results["dense"] = {"perplexity": res.perplexity, "tokens": res.tokens, "sparsity": 0.0}
        save()
    for label, kw in PATTERNS:
        for method in METHODS:
            key = f"{method} | {label}"
            if key in results:
                continue
            pruned = copy.deepcopy(model)
            cfg = HybridSparseConfig(method=method, nsamples=args.nsamples, seqlen=args.seqlen, **kw)
            start = time.perf_counter()
            report = apply_hybrid_sparsity(pruned, cfg, "wiki_offline", tokenizer=tok)
            seconds = time.perf_counter() - start
            res = ppl(pruned)
            results[key] = {
                "perplexity": res.perplexity,
                "tokens": res.tokens,
                "sparsity": report.sparsity,
                "prune_seconds": seconds,
            }
            save()
            print(
                f"{key}: ppl {res.perplexity:.2f} sparsity {report.sparsity:.2%} ({seconds:.0f} s)",
                flush=True,
            )
            del pruned
    results["_meta"] = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "torch": torch.__version__,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "eval_windows": args.eval_windows,
    }
    save()
    dense = results["dense"]["perplexity"]
    print(f"\nDense perplexity {dense:.2f} ({results['dense']['tokens']} tokens)\n")
    print("| pattern | sparsity | " + " | ".join(METHODS) + " |")
    print("|---|---:|" + "---:|" * len(METHODS))
    for label, _ in PATTERNS:
        cells = [results[f"{m} | {label}"] for m in METHODS]
        print(
            f"| {label} | {cells[0]['sparsity']:.1%} | "
            + " | ".join(f"{c['perplexity']:.2f}" for c in cells)
            + " |"
        )


if __name__ == "__main__":
    main()
