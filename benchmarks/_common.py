"""Helpers shared by the benchmark scripts (imported as ``_common`` from ``benchmarks/``)."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from typing import Any

import torch


def out(text: str = "") -> None:
    """Benchmark output for the reader (tables, ratios): stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def machine() -> dict[str, Any]:
    """What the numbers were measured on (recorded beside every result)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` plus the machine description to ``path``."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data | {"machine": machine()}, fh, indent=2)


# the linear layers of a Llama block (SmolLM2's): LoRA's target modules in the recovery benchmarks
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LLAMA_SHAPES = {
    "llama2-7b-shape": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    ),
    "llama2-7b-4layer": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32
    ),
    "e2e-tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}


def random_llama(shape: str, device: str, dtype: torch.dtype | None = None, seed: int = 0):
    """A Llama of one of :data:`LLAMA_SHAPES` with N(0, 0.02) weights, built on ``device``.

    ``dtype`` defaults to fp16 on CUDA and fp32 elsewhere.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **LLAMA_SHAPES[shape])
    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def smollm2_perplexity(model, tokenizer, seqlen: int, windows: int) -> float:
    """Held-out perplexity of ``model`` on the offline corpus test split (``windows`` x ``seqlen``)."""
    from hf_hybrid_sparse import perplexity

    model.eval()
    return perplexity(model, tokenizer, "wiki_offline", seqlen=seqlen, max_windows=windows).perplexity


def train(
    model, dataset, steps: int, batch: int, lr: float, trainer_kwargs: dict | None = None, **extra: Any
) -> float:
    """Fine-tune with ``SparseTrainer`` on CPU for ``steps`` (constant lr unless ``extra`` says otherwise, no
    weight decay); returns seconds.

    ``trainer_kwargs`` go to ``SparseTrainer`` (e.g. ``teacher_model``, ``distillation``), ``extra`` to
    ``TrainingArguments``."""
    from transformers import TrainingArguments

    from hf_hybrid_sparse import SparseTrainer

    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(
            output_dir=folder,
            max_steps=steps,
            per_device_train_batch_size=batch,
            learning_rate=lr,
            weight_decay=0.0,
            use_cpu=not torch.cuda.is_available(),
            report_to=[],
            save_strategy="no",
            logging_steps=5,
            disable_tqdm=True,
            **({"lr_scheduler_type": "constant"} | extra),
        )
        start = time.perf_counter()
        SparseTrainer(model=model, args=args, train_dataset=dataset, **(trainer_kwargs or {})).train()
        return time.perf_counter() - start
