"""What each hybrid-quality option contributes, one-shot, on the embedded SmolLM2-135M.

    python benchmarks/hybrid_quality.py [--only NAME,...] [--nsamples 32 --seqlen 512 --eval_windows 24]

Every variant prunes a fresh copy of the dense model to the hybrid recipe (0.35, 0.45, 0.20), 15/256, on the
same calibration (offline corpus train split, nsamples x seqlen) and is evaluated on the same held-out
windows (test split, non-overlapping). The baseline is the first rule (`tier_rule="score"`, blocks ranked
by summed score). "upfront" is the loss rule without SparseGPT's chunk-by-chunk re-choice of tiers on the
updated weights (the library always re-chooses with `tier_rule="loss"`; the benchmark switches it off by
wrapping `sparsegpt_prune` to measure what it adds). "+ reconstruction" adds block-wise reconstruction
(`reconstruction_epochs=4`, `reconstruction_lr=1e-4`, calibration batches of 4). Results are appended to the JSON as they finish (a
rerun skips what is there) and printed as a table with each variant's ratio to the baseline of its method.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import time
from pathlib import Path

from _common import machine, out, smollm2_perplexity
from transformers.utils import logging as hf_logging

import hf_hybrid_sparse.pruning.matrix as matrix
from hf_hybrid_sparse import HybridSparseConfig, apply_hybrid_sparsity
from hf_hybrid_sparse.models import load_model_and_tokenizer

VARIANTS = {
    # name: (method, recipe overrides, re-choose SparseGPT tiers per chunk)
    "sparsegpt row score": ("sparsegpt", dict(tier_group="row", tier_rule="score"), True),
    "sparsegpt row loss": ("sparsegpt", dict(tier_group="row"), True),
    "sparsegpt layer loss": ("sparsegpt", dict(tier_group="layer"), True),
    "sparsegpt row loss owl": ("sparsegpt", dict(tier_group="row", layer_allocation="owl"), True),
    "sparsegpt layer loss owl": ("sparsegpt", dict(tier_group="layer", layer_allocation="owl"), True),
    "sparsegpt row loss upfront": ("sparsegpt", dict(tier_group="row"), False),
    "sparsegpt row score owl": (
        "sparsegpt",
        dict(tier_group="row", tier_rule="score", layer_allocation="owl"),
        True,
    ),
    "wanda row score": ("wanda", dict(tier_group="row", tier_rule="score"), True),
    "wanda row loss": ("wanda", dict(tier_group="row"), True),
    "wanda layer loss": ("wanda", dict(tier_group="layer"), True),
    "wanda row loss owl": ("wanda", dict(tier_group="row", layer_allocation="owl"), True),
}
# block-wise reconstruction (EBFT-style) after each block: 4 passes over the calibration set in batches of 4
RECON = dict(reconstruction_epochs=4, reconstruction_lr=1e-4, batch_size=4)
VARIANTS |= {
    "sparsegpt row score + reconstruction": (
        "sparsegpt",
        dict(tier_group="row", tier_rule="score", **RECON),
        True,
    ),
    "sparsegpt row loss owl + reconstruction": (
        "sparsegpt",
        dict(tier_group="row", layer_allocation="owl", **RECON),
        True,
    ),
    "wanda row score + reconstruction": ("wanda", dict(tier_group="row", tier_rule="score", **RECON), True),
}
BASELINE = {"sparsegpt": "sparsegpt row score", "wanda": "wanda row score"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval_windows", type=int, default=24)
    ap.add_argument("--json", default="benchmarks/hybrid_quality.json")
    args = ap.parse_args()
    hf_logging.set_verbosity_warning()
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {}
    model, tok = load_model_and_tokenizer()

    def save():
        results["machine"] = machine()
        results["setup"] = {
            "nsamples": args.nsamples,
            "seqlen": args.seqlen,
            "eval_windows": args.eval_windows,
        }
        path.write_text(json.dumps(results, indent=2))

    if "dense" not in results:
        results["dense"] = {"perplexity": smollm2_perplexity(model, tok, args.seqlen, args.eval_windows)}
        save()
    names = args.only.split(",") if args.only else list(VARIANTS)
    original = matrix.sparsegpt_prune
    for name in names:
        if name in results:
            continue
        method, overrides, rechoose = VARIANTS[name]
        matrix.sparsegpt_prune = functools.partial(original, rechoose_tiers=rechoose)
        cfg = HybridSparseConfig(
            method=method, pattern="hybrid", nsamples=args.nsamples, seqlen=args.seqlen, **overrides
        )
        pruned = copy.deepcopy(model)
        start = time.perf_counter()
        report = apply_hybrid_sparsity(pruned, cfg, "wiki_offline", tokenizer=tok)
        seconds = time.perf_counter() - start
        ppl = smollm2_perplexity(pruned, tok, args.seqlen, args.eval_windows)
        results[name] = {
            "perplexity": ppl,
            "sparsity": report.sparsity,
            "tier_totals": report.tier_totals(),
            "prune_seconds": seconds,
            "reconstruction": report.reconstruction,
        }
        save()
        out(f"{name}: ppl {ppl:.2f}, sparsity {report.sparsity:.2%} ({seconds:.0f} s)")
        del pruned
    matrix.sparsegpt_prune = original
    dense = results["dense"]["perplexity"]
    out(f"\nDense perplexity {dense:.2f}\n")
    out("| variant | sparsity | perplexity | vs baseline of its method | vs dense |")
    out("|---|---:|---:|---:|---:|")
    for name, (method, _, _) in VARIANTS.items():
        if name not in results:
            continue
        r = results[name]
        base = results.get(BASELINE[method], {}).get("perplexity")
        ratio = f"{r['perplexity'] / base:.3f}x" if base else "n/a"
        out(
            f"| {name} | {r['sparsity']:.2%} | {r['perplexity']:.2f} | {ratio} | {r['perplexity'] / dense:.2f}x |"
        )


if __name__ == "__main__":
    main()
