"""Wall time and peak memory of pruning, against a one-sample-at-a-time loop and the compute floor.

    python benchmarks/prune_speed.py --model smollm2 --nsamples 32 --seqlen 512            # CPU
    python benchmarks/prune_speed.py --model llama2-7b-shape --nsamples 128 --seqlen 2048  # CUDA GPU

Variants, each in a fresh subprocess on a fresh model (so peak memory is its own):
  floor       two bare forward passes of the calibration batches through every block (no hooks,
              no pruning): the least any sequential engine can do;
  one-sample  Wanda unstructured 50% through the engine with batch_size=1 (one sample per forward,
              like the original Wanda code);
  wanda       Wanda unstructured 50%, batched;
  hybrid      Wanda hybrid (0.35, 0.45, 0.20);
  sparsegpt   SparseGPT unstructured 50%, batched;
  wanda-nostop, sparsegpt-nostop  the same with the statistics forwards run to their end (the engine
              otherwise stops each once every layer's input is recorded): what that stop saves.
Ratios are against `floor` and `wanda` measured in the same run. `--repeats N` runs the list N times,
interleaved (the machine's state drifts between variants), and reports medians. Peak memory: GPU
max_memory_allocated on CUDA; on CPU the growth of the process's peak RSS over the loaded model.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ["floor", "one-sample", "wanda", "hybrid", "sparsegpt"]
# the same as "wanda" / "sparsegpt" with every statistics forward run to its end (the stop disabled)
NOSTOP = ["wanda-nostop", "sparsegpt-nostop"]


def _load(name: str, device: str):
    if name == "smollm2":
        from hf_hybrid_sparse.models import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer()
        vocab = model.config.vocab_size
    else:
        from _common import random_llama

        # built on the CPU: pruning moves one block at a time to the compute device
        model = random_llama(name, "cpu", torch.float16 if device.startswith("cuda") else torch.float32)
        vocab = model.config.vocab_size
    return model.eval(), vocab


def run_variant(args) -> dict:
    from hf_hybrid_sparse import HybridSparseConfig, apply_hybrid_sparsity

    model, vocab = _load(args.model, args.device)
    on_gpu = args.device.startswith("cuda")
    tokens = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    if on_gpu:
        # model stays on the CPU; only the block being pruned goes to the GPU (config.device)
        model.get_input_embeddings().to(args.device)
        for name in ("rotary_emb",):
            sub = getattr(model.model, name, None)
            if sub is not None:
                sub.to(args.device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if not on_gpu:  # warm up kernels and thread pools outside the timed region
        with torch.no_grad():
            model(input_ids=tokens[:1, :8], use_cache=False)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base = dict(nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, device=args.device)
    start = time.perf_counter()
    cpu_start = time.process_time()
    if args.variant == "floor":
        from hf_hybrid_sparse.engine.capture import capture_block_inputs
        from hf_hybrid_sparse.engine.discovery import find_decoder_blocks

        _, blocks = find_decoder_blocks(model)
        dev = torch.device(args.device)
        captured = capture_block_inputs(model, blocks, list(torch.split(tokens, args.batch_size)), dev, dev)
        hidden = captured.hidden
        with torch.no_grad():
            for i, block in enumerate(blocks):
                block.to(dev)
                for b, h in enumerate(hidden):
                    captured.calls[i][b].call(block, h)
                hidden = [captured.calls[i][b].call(block, h) for b, h in enumerate(hidden)]
                block.to("cpu")
    else:
        if args.variant.endswith("-nostop"):
            from hf_hybrid_sparse.engine import statistics as engine_statistics

            engine_statistics._EarlyStop.seen = lambda self, name: None
        cfg = {
            "one-sample": dict(method="wanda", pattern="unstructured", batch_size=1),
            "wanda": dict(method="wanda", pattern="unstructured"),
            "hybrid": dict(method="wanda", pattern="hybrid"),
            "sparsegpt": dict(method="sparsegpt", pattern="unstructured"),
        }[args.variant.removesuffix("-nostop")]
        apply_hybrid_sparsity(model, HybridSparseConfig(**(base | cfg)), tokens)
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if on_gpu
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    )
    return {"variant": args.variant, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mib": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "llama2-7b-shape", "tiny"])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variant", choices=VARIANTS + NOSTOP)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument(
        "--repeats", type=int, default=1, help="run the variant list this many times, interleaved"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--variant", variant] + [
                f"--{k}={v}"
                for k, v in vars(args).items()
                if k not in ("variant", "variants", "json", "repeats") and v is not None
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
            r = json.loads(line[0][7:])
            runs.setdefault(variant, []).append(r)
            print(
                f"{variant}: {r['seconds']:.2f} s, {r['cpu_seconds']:.1f} CPU-s, peak {r['peak_mib']:.0f} MiB",
                flush=True,
            )
    results = {
        v: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "cpu_seconds", "peak_mib")}
        | {"variant": v, "cpu_seconds_all": [r["cpu_seconds"] for r in rs]}
        for v, rs in runs.items()
    }
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    print(
        f"\n{args.model}, {args.nsamples} x {args.seqlen} tokens, batch {args.batch_size}, {device}, torch {torch.__version__}\n"
    )
    cpu_floor = results.get("floor", {}).get("cpu_seconds")
    if args.repeats > 1:
        print(f"medians of {args.repeats} interleaved runs each")
    print("| variant | seconds | CPU-seconds | x floor (CPU) | x wanda (CPU) | peak MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    cpu_wanda = results.get("wanda", {}).get("cpu_seconds")
    for v, r in results.items():
        xf = f"{r['cpu_seconds'] / cpu_floor:.2f}" if cpu_floor else ""
        xw = f"{r['cpu_seconds'] / cpu_wanda:.2f}" if cpu_wanda else ""
        print(f"| {v} | {r['seconds']:.2f} | {r['cpu_seconds']:.1f} | {xf} | {xw} | {r['peak_mib']:.0f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device, "args": vars(args), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
