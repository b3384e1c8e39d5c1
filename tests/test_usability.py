"""Issue #12: the package behaves like the Hugging Face tools its users already know."""

import subprocess
import sys
import textwrap

from procs import subprocess_env

LOGS = textwrap.dedent(
    """
    import sys
    from transformers.utils import logging
    from hf_hybrid_sparse.api import logger as api_logger
    from hf_hybrid_sparse.engine.sequential import logger as engine_logger
    getattr(logging, "set_verbosity_" + sys.argv[1])()
    api_logger.info("INFO-FROM-API")
    engine_logger.warning("WARNING-FROM-ENGINE")
    """
)


def _logs(level):
    res = subprocess.run(
        [sys.executable, "-c", LOGS, level], capture_output=True, text=True, env=subprocess_env(), timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stderr


def test_one_verbosity_switch_shows_or_silences_the_package():
    """transformers.logging.set_verbosity_*() governs the package's loggers (children of `transformers`)."""
    info = _logs("info")
    assert "INFO-FROM-API" in info and "WARNING-FROM-ENGINE" in info
    default = _logs("warning")
    assert "INFO-FROM-API" not in default and "WARNING-FROM-ENGINE" in default
    quiet = _logs("error")
    assert "INFO-FROM-API" not in quiet and "WARNING-FROM-ENGINE" not in quiet


def test_sparse_trainer_has_trainers_signature(tmp_path):
    """Positional arguments work (callbacks included) and inspect shows the real parameters."""
    import inspect

    from tiny_models import tiny_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_hybrid_sparse import SparseTrainer

    params = inspect.signature(SparseTrainer).parameters
    trainer_params = list(inspect.signature(Trainer).parameters)
    assert list(params)[: len(trainer_params)] == trainer_params
    assert params["allow_dense"].kind is inspect.Parameter.KEYWORD_ONLY

    class Mine(TrainerCallback):
        pass

    mine = Mine()
    model = tiny_model("llama")
    args = TrainingArguments(str(tmp_path), report_to=[], max_steps=1)
    # model, args, data_collator, train_dataset, eval_dataset, processing_class, model_init,
    # compute_loss_func, compute_metrics, callbacks -- all positional
    trainer = SparseTrainer(model, args, None, None, None, None, None, None, None, [mine], allow_dense=True)
    kinds = [type(c) for c in trainer.callback_handler.callbacks]
    assert Mine in kinds and type(trainer.sparsity_callback) in kinds


def test_a_gguf_loaded_model_prunes_and_saves(tmp_path):
    """`from_pretrained(folder, gguf_file=...)` dequantises: the GGUF quantizer must not block the save."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_hybrid_sparse import HybridSparseConfig, apply_hybrid_sparsity
    from hf_hybrid_sparse.models import resolve_model

    folder, gguf = resolve_model(None)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    assert type(model.hf_quantizer).__name__ == "GgufHfQuantizer"
    config = HybridSparseConfig(method="magnitude", pattern="2:4", targets=["mlp.down_proj"])
    report = apply_hybrid_sparsity(model, config)
    assert report.sparsity == 0.5
    model.save_pretrained(tmp_path / "pruned")
    plain = subprocess.run(  # the plain-transformers reader sees the zeros
        [
            sys.executable,
            "-c",
            "import sys; from transformers import AutoModelForCausalLM as A; "
            "m = A.from_pretrained(sys.argv[1]); w = m.model.layers[3].mlp.down_proj.weight; "
            "print((w == 0).float().mean().item())",
            str(tmp_path / "pruned"),
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert float(plain.stdout.split()[-1]) >= 0.5
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert type(reloaded.hf_quantizer).__name__ == "HybridSparseHfQuantizer"
