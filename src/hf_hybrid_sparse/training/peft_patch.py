"""Make every LoRA adapter that peft puts on a pruned layer sparsity-preserving, whatever route creates it.

peft asks each LoRA layer which variant to use (``resolve_lora_variant``) when it builds an adapter. This
module wraps that method of ``peft.tuners.lora.layer.Linear`` so that a layer whose base weight carries
sparsity state gets :class:`~hf_hybrid_sparse.training.lora.MaskedLoraVariant` (or the remask variant,
see :func:`~hf_hybrid_sparse.training.lora.lora_mode`). ``get_peft_model``, ``PeftModel.from_pretrained``
and TRL's ``SFTTrainer(peft_config=...)`` all go through it.

peft is slow to import, so the wrapper is applied when peft's LoRA layer module is first imported (an
import hook), or at once if it already is.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
from typing import Any

_TARGET = "peft.tuners.lora.layer"
_MARK = "_hf_hybrid_sparse_wrapped"


def _wrap(layer_module: Any) -> None:
    cls = getattr(layer_module, "Linear", None)
    original = getattr(cls, "resolve_lora_variant", None)
    if original is None or getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def resolve_lora_variant(self, *args, **kwargs):
        from .lora import variant_for

        return variant_for(self, original(self, *args, **kwargs))

    setattr(resolve_lora_variant, _MARK, True)
    cls.resolve_lora_variant = resolve_lora_variant


class _Loader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _wrap(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Wrap peft's variant resolution now if peft's LoRA layers are imported, else when they are (idempotent)."""
    if _TARGET in sys.modules:
        _wrap(sys.modules[_TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
