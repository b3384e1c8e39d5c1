"""The model's sparsity on disk: the safetensors format, the transformers quantizer, atomic saves, the Hub."""

from .format import FORMAT_VERSION
from .hub import build_model_card, push_to_hub, render_model_card, save_model_card
from .quantizer import HybridSparseHfQuantizer, attach
from .reader import read_sparsity_summary
from .saving import recover, save_pretrained, save_pruned

__all__ = [
    "FORMAT_VERSION",
    "HybridSparseHfQuantizer",
    "attach",
    "push_to_hub",
    "render_model_card",
    "build_model_card",
    "save_model_card",
    "read_sparsity_summary",
    "recover",
    "save_pretrained",
    "save_pruned",
]
