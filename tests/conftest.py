import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import settings  # noqa: E402

# CI explores the same examples every run (no flaky red); locally hypothesis keeps searching anew
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M (dequantised GGUF) and its tokenizer, loaded once per session."""
    from hf_hybrid_sparse.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(None)
    return model, tokenizer


@pytest.fixture
def smollm2_copy(smollm2):
    """A private deep copy of the embedded model (tests may prune it)."""
    model, tokenizer = smollm2
    return copy.deepcopy(model), tokenizer


@pytest.fixture
def tiny_checkpoint(tmp_path, smollm2):
    """A tiny random Llama with the real SmolLM2 tokenizer, saved as a normal HF folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    _, tok = smollm2
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.fixture(autouse=True)
def _package_logs_reach_caplog():
    """The package logs under the `transformers` logger, which does not propagate; caplog listens at root."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    yield
    hf_logging.disable_propagation()


@pytest.fixture(params=["native", "numpy"])
def checks(request, monkeypatch):
    """Run a test once with the extension's one-pass mask checks and once with the NumPy ones."""
    from hf_hybrid_sparse import native

    if request.param == "native":
        assert native.load(), "the extension must build here (g++ is on this machine and in CI)"
    else:
        monkeypatch.setenv(native.ENV, "reference")
    return request.param
