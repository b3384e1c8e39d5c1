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
