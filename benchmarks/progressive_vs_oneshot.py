"""Progressive (3 iterations) vs one-shot pruning of SmolLM2-135M to (0.35, 0.45, 0.20), same fine-tuning budget.

    python benchmarks/progressive_vs_oneshot.py [--method wanda --steps 10 --nsamples 16]

Progressive: examples/progressive.csv (0.70/0.30/0 -> 0.50/0.40/0.10 -> 0.35/0.45/0.20), `--steps` full
fine-tuning steps after each iteration. One-shot: prune straight to (0.35, 0.45, 0.20), then 3 x `--steps`
steps. Same data (offline corpus train split), learning rate and evaluation (test split).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

from _common import write_json
from transformers.utils import logging as hf_logging

from hf_hybrid_sparse import HybridSparseConfig
from hf_hybrid_sparse.models import load_model_and_tokenizer
from hf_hybrid_sparse.training.progressive import ProgressiveSettings, run_progressive, summary_markdown
from hf_hybrid_sparse.training.schedule import load_schedule, parse_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--train_seqlen", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--eval_windows", type=int, default=16)
    ap.add_argument("--json", default="benchmarks/progressive_vs_oneshot.json")
    args = ap.parse_args()
    hf_logging.set_verbosity_warning()
    model, tok = load_model_and_tokenizer()
    config = HybridSparseConfig(
        method=args.method, pattern="hybrid", nsamples=args.nsamples, seqlen=args.seqlen
    )

    def settings(steps):
        return ProgressiveSettings(
            config=config,
            calib="wiki_offline",
            train_seqlen=args.train_seqlen,
            finetune_steps=steps,
            learning_rate=args.lr,
            batch_size=4,
            eval_data="wiki_offline",
            eval_seqlen=args.train_seqlen,
            eval_windows=args.eval_windows,
        )

    results = {}
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        prog = run_progressive(
            copy.deepcopy(model),
            tok,
            load_schedule("examples/progressive.csv"),
            settings(args.steps),
            f"{out}/progressive",
            model_id="smollm2",
        )
        results["progressive"] = {"summary": prog, "seconds": time.perf_counter() - t0}
        t0 = time.perf_counter()
        one = parse_rows(
            [
                {
                    "iteration": 1,
                    "target_dense_ratio": 0.35,
                    "target_2_4_ratio": 0.45,
                    "target_topk_ratio": 0.20,
                }
            ]
        )
        shot = run_progressive(
            copy.deepcopy(model), tok, one, settings(3 * args.steps), f"{out}/oneshot", model_id="smollm2"
        )
        results["oneshot"] = {"summary": shot, "seconds": time.perf_counter() - t0}
    results["setup"] = vars(args)
    write_json(args.json, results)
    out("progressive:\n" + summary_markdown(prog))
    out("one-shot:\n" + summary_markdown(shot))
    out(
        f"final perplexity: progressive {prog[-1]['perplexity']:.2f}, one-shot {shot[-1]['perplexity']:.2f} "
        f"(same {3 * args.steps} fine-tuning steps in total)"
    )


if __name__ == "__main__":
    main()
