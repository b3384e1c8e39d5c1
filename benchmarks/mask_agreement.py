"""Do batched calibration forwards give the masks of one-sample forwards? (embedded SmolLM2-135M, CPU)

    python benchmarks/mask_agreement.py [--method wanda] [--pattern unstructured] [--nsamples 32 --seqlen 512]
        [--batch_sizes 8,1]

Prunes fresh copies of the dense model with the same recipe and calibration ids, once per calibration
batch size (the reference Wanda / SparseGPT code forwards one sample at a time), and prints the share of
mask entries on which every run agrees with the last batch size, per decoder block and model-wide, with
each run's time. Results go to ``benchmarks/mask_agreement.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from _common import machine, out
from transformers.utils import logging as hf_logging

from hf_hybrid_sparse import HybridSparseConfig, apply_hybrid_sparsity, sparsity_masks
from hf_hybrid_sparse.models import load_model_and_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch_sizes", default="8,1")
    ap.add_argument("--json", default="benchmarks/mask_agreement.json")
    args = ap.parse_args()
    hf_logging.set_verbosity_warning()
    model, tok = load_model_and_tokenizer()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    masks, seconds = {}, {}
    for bs in sizes:
        pruned = copy.deepcopy(model)
        cfg = HybridSparseConfig(
            method=args.method,
            pattern=args.pattern,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            batch_size=bs,
        )
        start = time.perf_counter()
        apply_hybrid_sparsity(pruned, cfg, "wiki_offline", tokenizer=tok)
        seconds[bs] = time.perf_counter() - start
        masks[bs] = {k: v.cpu() for k, v in sparsity_masks(pruned).items()}
        del pruned
    reference = sizes[-1]
    result = {"setup": vars(args), "machine": machine(), "seconds": seconds, "agreement": {}}
    for bs in sizes[:-1]:
        per_block: dict[int, list[int]] = {}
        for name, ref in masks[reference].items():
            block = int(name.split(".layers.")[1].split(".")[0])
            same = int((masks[bs][name] == ref).sum())
            acc = per_block.setdefault(block, [0, 0])
            acc[0] += same
            acc[1] += ref.numel()
        total = sum(v[0] for v in per_block.values()) / sum(v[1] for v in per_block.values())
        blocks = {b: v[0] / v[1] for b, v in sorted(per_block.items())}
        result["agreement"][f"batch {bs} vs batch {reference}"] = {"model": total, "per_block": blocks}
        out(f"batch {bs} vs batch {reference}: {total:.5%} of mask entries agree")
        out("per block: " + ", ".join(f"{b}: {a:.4%}" for b, a in blocks.items()))
    out("seconds: " + ", ".join(f"batch {b}: {s:.0f}" for b, s in seconds.items()))
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
