"""Recovery of a pruned SmolLM2-135M by short fine-tuning on CPU: full (SparseTrainer) and mask-aware LoRA.

    python benchmarks/recovery.py [--steps 30 --seqlen 256 --batch 4]

Prunes the embedded model with Wanda to 50% unstructured sparsity (32 x 512 calibration tokens of the
offline corpus train split), then from that same pruned model runs (a) full fine-tuning and (b) LoRA
(r=16, masked, merged afterwards), both on train-split windows. Perplexity is measured on the held-out
test split (non-overlapping windows) before pruning, after pruning and after each recovery.
"""

from __future__ import annotations

import argparse
import copy
import json

from _common import LLAMA_PROJECTIONS, out, smollm2_perplexity, train, write_json
from peft import LoraConfig
from transformers.utils import logging as hf_logging

from hf_hybrid_sparse import (
    HybridSparseConfig,
    apply_hybrid_sparsity,
    get_sparse_peft_model,
    merge_sparse_lora,
    sparsity_masks,
)
from hf_hybrid_sparse.data.calibration import lm_dataset
from hf_hybrid_sparse.models import load_model_and_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--eval_windows", type=int, default=24)
    ap.add_argument("--json", default="benchmarks/recovery.json")
    args = ap.parse_args()
    hf_logging.set_verbosity_warning()
    model, tok = load_model_and_tokenizer()

    def ppl(m):
        return smollm2_perplexity(m, tok, args.seqlen, args.eval_windows)

    results = {"dense": ppl(model)}
    apply_hybrid_sparsity(
        model,
        HybridSparseConfig(method="wanda", pattern="unstructured", sparsity=0.5, nsamples=32, seqlen=512),
        "wiki_offline",
        tokenizer=tok,
    )
    results["pruned"] = ppl(model)
    data = lm_dataset("wiki_offline", tok, args.seqlen, max_samples=args.steps * args.batch)

    full = copy.deepcopy(model)
    seconds = train(full, data, args.steps, args.batch, 5e-5)
    results["full"] = {"perplexity": ppl(full), "seconds": seconds, "lr": 5e-5}
    lora_model = get_sparse_peft_model(
        copy.deepcopy(model),
        LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=LLAMA_PROJECTIONS,
        ),
    )
    seconds = train(lora_model, data, args.steps, args.batch, 5e-4)
    merged, _ = merge_sparse_lora(lora_model)
    results["lora"] = {"perplexity": ppl(merged), "seconds": seconds, "lr": 5e-4}
    for name in ("full", "lora"):
        m = full if name == "full" else merged
        masks = sparsity_masks(m)
        params = dict(m.named_parameters())
        results[name]["pruned_weights_nonzero"] = int(
            sum(int((params[k][~v] != 0).sum()) for k, v in masks.items())
        )
    results["setup"] = {
        "steps": args.steps,
        "batch": args.batch,
        "seqlen": args.seqlen,
        "eval_tokens": args.eval_windows * (args.seqlen - 1),
    }
    write_json(args.json, results)
    out(json.dumps(results, indent=2))
    out(
        f"\n| model | held-out perplexity | train time |\n|---|---:|---:|\n| dense | {results['dense']:.2f} | |"
        f"\n| Wanda 50% | {results['pruned']:.2f} | |"
        f"\n| + full FT, {args.steps} steps | {results['full']['perplexity']:.2f} | {results['full']['seconds']:.0f} s |"
        f"\n| + LoRA r=16 (masked, merged), {args.steps} steps | {results['lora']['perplexity']:.2f} | {results['lora']['seconds']:.0f} s |"
    )


if __name__ == "__main__":
    main()
