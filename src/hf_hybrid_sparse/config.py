"""`HybridSparseConfig`: the pruning recipe, registered as a transformers quantization config."""

from __future__ import annotations

import copy
import functools
import math
import re
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import ConfigError

QUANT_METHOD = "hybrid_sparse"
LOADING_ATTRIBUTES = ("use_kernels",)
METHODS = ("magnitude", "wanda", "sparsegpt")
GROUPS = ("row", "layer")
TIER_RULES = ("loss", "score")
ALLOCATIONS = ("uniform", "owl")
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


NM_CONVENTIONS = ("keep", "prune")


def parse_nm(text: str) -> tuple[int, int]:
    """Parse a canonical ``"N:M"`` string (N *kept* of every M, as stored in checkpoints) into ``(N, M)``."""
    match = _NM_RE.match(str(text))
    if not match:
        raise ConfigError(f"N:M pattern {text!r} is not of the form 'N:M' (e.g. '2:4': keep 2 of every 4).")
    n, m = int(match.group(1)), int(match.group(2))
    if m < 1 or n < 1:
        raise ConfigError(f"N:M pattern {text!r}: N and M must be positive.")
    if n > m:
        raise ConfigError(f"N:M pattern {text!r}: N={n} > M={m}; N counts the kept weights, so N <= M.")
    return n, m


def _parse_pruned(text: str) -> tuple[int, int]:
    """``"N:M"`` with N *pruned* of every M, as ``(kept, M)``."""
    match = _NM_RE.match(str(text))
    if not match:
        raise ConfigError(f"N:M pattern {text!r} is not of the form 'N:M' (e.g. '2:4').")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 <= n < m:
        raise ConfigError(f"N:M pattern {text!r} read as 'prune N of M' needs 0 <= N < M.")
    return m - n, m


@dataclass
class HybridSparseConfig(QuantizationConfigMixin):
    """Recipe for pruning a causal LM (see DESIGN.md, "Sparsity semantics").

    Args:
        method: ``"magnitude"`` (|W|), ``"wanda"`` (|W| * ||X_j||_2) or ``"sparsegpt"`` (OBS with weight update).
        pattern: ``"unstructured"``, an ``"N:M"`` string (N kept of every M consecutive inputs) or ``"hybrid"``.
        sparsity: fraction of weights removed by the ``unstructured`` pattern, in [0, 1).
        comparison_group: ``"row"`` (per output row, as Wanda) or ``"layer"`` for ``unstructured`` (with
            SparseGPT, ``"layer"`` chooses each lazy-update chunk's mask over all rows, as the paper does).
            ``None`` (default) resolves to the method's paper: ``"layer"`` for ``sparsegpt``, else ``"row"``.
        block_size: side of the square blocks of the ``hybrid`` pattern.
        tier_ratios: fractions of blocks that are DENSE, NM, TOPK; non-negative, summing to 1.
        tier_group: rank blocks across the whole ``"layer"`` or within each block-``"row"``.
        tier_rule: ``"loss"`` (default): tiers that remove the least score mass (squared Wanda/magnitude
            score, SparseGPT saliency) under the tier counts, solved exactly; ``"score"``: blocks ranked by
            summed score (the first rule).
        layer_allocation: ``"uniform"`` (default) or ``"owl"``: one pass over the dense model measures each
            decoder block's share of outlier scores (above ``owl_threshold`` x mean) and blocks with more
            keep more weights, by at most ``owl_lambda`` of density; the model-wide DENSE/NM/TOPK counts
            (hybrid) or sparsity (unstructured) stay as asked (see ``engine/allocation.py``).
        nm: the N:M pattern inside NM blocks (along the input dimension).
        nm_convention: what N counts in ``pattern``/``nm`` when they could be read two ways: ``"keep"``
            (NVIDIA: ``"3:4"`` keeps 3) or ``"prune"`` (SparseGPT/Wanda/llm-compressor: ``"3:4"`` prunes 3).
            Needed only when N != M/2 (``"2:4"``, ``"4:8"`` mean the same either way); the config then
            stores the kept form (``nm_convention="keep"``).
        topk_per_block: weights kept in a TOPK block.
        indivisible: what to do with a layer whose shape does not divide into blocks (or M):
            ``"error"`` (default) or ``"skip"`` (leave it dense and say so in the report).
        nsamples, seqlen, seed, batch_size: calibration set size, sample length, RNG seed, forward batch.
        targets: modules to prune (a list of names/suffixes or one regex); ``None`` means every linear
            layer inside the decoder blocks.
        ignore: modules never pruned (list of names/suffixes or a regex); ``lm_head`` by default.
        dampening: SparseGPT's relative Hessian dampening (fraction of the mean diagonal).
        sparsegpt_blocksize: SparseGPT's lazy-update column chunk (a multiple of ``block_size`` and M).
        reconstruction_epochs: block-wise reconstruction after each block is pruned: passes of masked Adam
            over the calibration batches fitting the block's kept weights so that, on the pruned model's
            inputs, it reproduces the outputs the model gave before this run (the dense model's, on a first
            pruning) (0, default: off; needs calibration data).
        reconstruction_lr: the learning rate of that reconstruction.
        device: compute device for the block being pruned (``None``: where the block already is).
        offload_activations: keep the calibration activations on CPU between blocks.
        use_kernels: a loading attribute: ``from_pretrained(..., quantization_config=HybridSparseConfig(
            use_kernels=True))`` converts the hybrid layers to packed ``HybridSparseLinear`` after loading.
    """

    method: str = field(
        default="wanda",
        metadata={
            "help": "Score: magnitude (|W|), wanda (|W| * ||X_j||_2) or sparsegpt (OBS with weight update).",
            "choices": list(METHODS),
        },
    )
    pattern: str = field(
        default="hybrid",
        metadata={"help": "unstructured, an N:M string (N kept of every M inputs, e.g. 2:4) or hybrid."},
    )
    sparsity: float = field(default=0.5, metadata={"help": "Fraction pruned by the unstructured pattern."})
    comparison_group: str | None = field(
        default=None,
        metadata={
            "help": "unstructured: compare weights per output row or per layer (SparseGPT: per 128-column "
            "chunk over all rows). Default: each method's paper, row for wanda/magnitude, layer for sparsegpt.",
            "choices": list(GROUPS),
        },
    )
    block_size: int = field(default=16, metadata={"help": "Side of the square blocks of the hybrid pattern."})
    tier_ratios: tuple[float, float, float] = field(
        default=(0.35, 0.45, 0.20),
        metadata={"help": "Fractions of blocks that are DENSE, NM, TOPK (comma-separated, sum 1)."},
    )
    tier_group: str = field(
        default="layer",
        metadata={
            "help": "Rank blocks across the whole layer or within each block-row.",
            "choices": list(GROUPS),
        },
    )
    tier_rule: str = field(
        default="loss",
        metadata={
            "help": "How blocks get tiers: loss (least score mass removed under the tier counts, exact) or "
            "score (rank blocks by summed score; the first rule).",
            "choices": list(TIER_RULES),
        },
    )
    layer_allocation: str = field(
        default="uniform",
        metadata={
            "help": "How the budget is spread over layers: uniform (every layer the same) or owl (layers "
            "with more activation outliers keep more weights; model-wide shares unchanged).",
            "choices": list(ALLOCATIONS),
        },
    )
    owl_threshold: float = field(
        default=5.0, metadata={"help": "OWL: a score is an outlier above this many times its block's mean."}
    )
    owl_lambda: float = field(
        default=0.08, metadata={"help": "OWL: largest density shift of a block from the model-wide target."}
    )
    nm: str = field(default="2:4", metadata={"help": "N:M pattern inside NM blocks, along the input."})
    nm_convention: str | None = field(
        default=None,
        metadata={
            "help": "What N counts in an N:M with N != M/2: keep (NVIDIA, 3:4 keeps 3) or prune "
            "(SparseGPT/Wanda, 3:4 prunes 3). Not needed for 2:4 or 4:8.",
            "choices": list(NM_CONVENTIONS),
        },
    )
    topk_per_block: int = field(default=15, metadata={"help": "Weights kept in a TOPK block."})
    indivisible: str = field(
        default="error",
        metadata={
            "help": "Layers whose shape does not tile: error, or skip (left dense, listed in the report).",
            "choices": ["error", "skip"],
        },
    )
    nsamples: int = field(default=128, metadata={"help": "Calibration samples."})
    seqlen: int = field(default=2048, metadata={"help": "Tokens per calibration sample."})
    seed: int = field(default=0, metadata={"help": "Seed of the calibration sampling."})
    batch_size: int = field(default=8, metadata={"help": "Calibration samples per forward."})
    targets: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules to prune: names/suffixes (comma-separated) or one regex; default every "
            "linear layer inside the decoder blocks."
        },
    )
    ignore: list[str] | str | None = field(
        default_factory=lambda: ["lm_head"],
        metadata={"help": "Modules never pruned: names/suffixes (comma-separated) or one regex."},
    )
    dampening: float = field(
        default=0.01,
        metadata={"help": "SparseGPT: relative Hessian dampening (fraction of the mean diagonal)."},
    )
    sparsegpt_blocksize: int = field(
        default=128,
        metadata={"help": "SparseGPT: lazy-update column chunk (a multiple of block_size and M)."},
    )
    reconstruction_epochs: int = field(
        default=0,
        metadata={
            "help": "Block-wise reconstruction: passes of masked Adam over the calibration batches fitting each "
            "pruned block's kept weights to the dense model's outputs (0: off)."
        },
    )
    reconstruction_lr: float = field(
        default=1e-4, metadata={"help": "Learning rate of the block-wise reconstruction."}
    )
    device: str | None = field(
        default=None, metadata={"help": "Compute device for the block being pruned (default: where it is)."}
    )
    offload_activations: bool = field(
        default=False, metadata={"help": "Keep calibration activations on CPU between blocks."}
    )
    use_kernels: bool = field(
        default=False,
        metadata={
            "help": "Loading attribute: convert hybrid layers to packed HybridSparseLinear on load.",
            "recipe": False,
        },
    )
    format_version: int = field(default=1, metadata={"help": "On-disk format version.", "recipe": False})
    quant_method: str = field(
        default=QUANT_METHOD, metadata={"help": "transformers quant_method.", "recipe": False}
    )

    def __post_init__(self) -> None:
        self._normalize_types()
        if self.comparison_group is None:
            self.comparison_group = "layer" if self.method == "sparsegpt" else "row"
        self._canonical_nm()
        self.validate()

    def _canonical_nm(self) -> None:
        """Rewrite ``pattern``/``nm`` in the kept form; refuse an N:M whose meaning depends on the convention."""
        if self.nm_convention is not None and self.nm_convention not in NM_CONVENTIONS:
            raise ConfigError(f"nm_convention={self.nm_convention!r}; choose 'keep' or 'prune'.")
        for name in ("pattern", "nm"):
            text = getattr(self, name)
            if name == "pattern" and text in ("unstructured", "hybrid"):
                continue
            n, m = parse_nm(text) if self.nm_convention != "prune" else _parse_pruned(text)
            if self.nm_convention is None and n < m and 2 * n != m:  # both readings valid, and they differ
                raise ConfigError(
                    f"{name}={text!r} is ambiguous: NVIDIA's convention reads it as keep {n} of every {m}, "
                    f"SparseGPT/Wanda/llm-compressor's as prune {n} of every {m} (keep {m - n}). Say which "
                    "with nm_convention='keep' or nm_convention='prune'."
                )
            setattr(self, name, f"{n}:{m}")
        if self.nm_convention == "prune":
            self.nm_convention = "keep"

    def _normalize_types(self) -> None:
        """Coerce values that mean the same (``16.0`` -> ``16``, tuples -> lists); refuse the rest, naming the field."""
        for name, kind in _field_kinds().items():
            value = getattr(self, name)
            if kind == "int":
                value = _as_int(name, value)
            elif kind == "float":
                value = _as_float(name, value)
            elif kind == "bool":
                if not isinstance(value, bool):
                    raise ConfigError(
                        f"{name} must be True or False, got {value!r} ({type(value).__name__})."
                    )
            elif kind in ("str", "str?"):
                if not (isinstance(value, str) or (kind == "str?" and value is None)):
                    raise ConfigError(f"{name} must be a string, got {value!r} ({type(value).__name__}).")
            elif kind == "ratios":
                if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                    raise ConfigError(f"tier_ratios must be three numbers (DENSE, NM, TOPK), got {value!r}.")
                value = tuple(_as_float("tier_ratios", r) for r in value)
            elif kind == "names":
                if isinstance(value, tuple):
                    value = list(value)
                if not (
                    value is None
                    or isinstance(value, str)
                    or (isinstance(value, list) and all(isinstance(v, str) for v in value))
                ):
                    raise ConfigError(
                        f"{name} must be None, a regex string or a list of module names, got {value!r}."
                    )
            setattr(self, name, value)

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field and the fix if the recipe is inconsistent."""
        if self.quant_method != QUANT_METHOD:
            raise ConfigError(f"quant_method must be {QUANT_METHOD!r}, got {self.quant_method!r}.")
        if self.format_version != 1:
            raise ConfigError(f"format_version {self.format_version} is not supported by this version (1).")
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is unknown; choose one of {', '.join(METHODS)}.")
        if self.pattern not in ("unstructured", "hybrid"):
            parse_nm(self.pattern)
        if not (0.0 <= float(self.sparsity) < 1.0):
            raise ConfigError(f"sparsity={self.sparsity} is outside [0, 1).")
        for name in ("comparison_group", "tier_group"):
            if getattr(self, name) not in GROUPS:
                raise ConfigError(f"{name}={getattr(self, name)!r}; choose 'row' or 'layer'.")
        if self.tier_rule not in TIER_RULES:
            raise ConfigError(f"tier_rule={self.tier_rule!r}; choose one of {', '.join(TIER_RULES)}.")
        if self.layer_allocation not in ALLOCATIONS:
            raise ConfigError(
                f"layer_allocation={self.layer_allocation!r}; choose one of {', '.join(ALLOCATIONS)}."
            )
        if self.layer_allocation != "uniform" and self.pattern not in ("unstructured", "hybrid"):
            raise ConfigError(
                f"layer_allocation={self.layer_allocation!r} spreads an unstructured or hybrid budget; an N:M "
                f"pattern ({self.pattern}) is the same in every layer. Use layer_allocation='uniform'."
            )
        if not (self.owl_threshold > 0):
            raise ConfigError(f"owl_threshold={self.owl_threshold} must be positive (OWL uses 5).")
        if not (0 <= self.owl_lambda < 0.5):
            raise ConfigError(f"owl_lambda={self.owl_lambda} must be in [0, 0.5) (OWL uses about 0.08).")
        if self.indivisible not in ("error", "skip"):
            raise ConfigError(f"indivisible={self.indivisible!r}; choose 'error' or 'skip'.")
        if len(self.tier_ratios) != 3:
            raise ConfigError(f"tier_ratios needs 3 values (DENSE, NM, TOPK), got {len(self.tier_ratios)}.")
        if any(r < 0 or not math.isfinite(r) for r in self.tier_ratios):
            raise ConfigError(f"tier_ratios {self.tier_ratios} contains a negative or non-finite value.")
        if abs(sum(self.tier_ratios) - 1.0) > 1e-6:
            raise ConfigError(f"tier_ratios {self.tier_ratios} sum to {sum(self.tier_ratios):.6g}, not 1.")
        n, m = parse_nm(self.nm)
        if self.pattern_nm is not None and self.pattern_nm[0] == self.pattern_nm[1]:
            raise ConfigError(f"pattern={self.pattern!r} keeps every weight: nothing would be pruned.")
        if self.pattern == "hybrid" and n == m:
            raise ConfigError(
                f"nm={self.nm!r} keeps every weight of the NM blocks; use a sparser N:M such as '2:4'."
            )
        if self.block_size < 1:
            raise ConfigError(f"block_size={self.block_size} must be positive.")
        if self.pattern == "hybrid" and self.block_size % m:
            raise ConfigError(
                f"block_size={self.block_size} is not a multiple of M={m} of the NM tier ({self.nm})."
            )
        area = self.block_size * self.block_size
        if not (0 <= self.topk_per_block <= area):
            raise ConfigError(
                f"topk_per_block={self.topk_per_block} does not fit a {self.block_size}x{self.block_size} "
                f"block ({area} weights)."
            )
        if self.pattern == "hybrid" and self.topk_per_block == area:
            raise ConfigError(
                f"topk_per_block={area} keeps every weight of a TOPK block; choose fewer (default 15 of 256)."
            )
        for name in ("nsamples", "seqlen", "batch_size", "sparsegpt_blocksize"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.reconstruction_epochs < 0:
            raise ConfigError(f"reconstruction_epochs={self.reconstruction_epochs} must be >= 0 (0: off).")
        if not (self.reconstruction_lr > 0 and math.isfinite(self.reconstruction_lr)):
            raise ConfigError(f"reconstruction_lr={self.reconstruction_lr} must be a positive number.")
        if self.reconstruction_epochs and self.method == "magnitude":
            raise ConfigError(
                "reconstruction_epochs fits pruned blocks to the dense model on calibration data, which "
                "method='magnitude' does not read; use method='wanda' or 'sparsegpt', or reconstruction_epochs=0."
            )
        if not (self.dampening >= 0.0):
            raise ConfigError(f"dampening={self.dampening} must be >= 0.")
        if self.method == "sparsegpt":
            step = self.block_size if self.pattern == "hybrid" else 1
            if self.pattern not in ("unstructured", "hybrid"):
                step = parse_nm(self.pattern)[1]
            if self.sparsegpt_blocksize % step:
                raise ConfigError(
                    f"sparsegpt_blocksize={self.sparsegpt_blocksize} must be a multiple of {step} "
                    f"for pattern {self.pattern!r}."
                )
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as exc:
                    raise ConfigError(f"{name}={value!r} is not a valid regular expression: {exc}") from None

    # -- helpers --------------------------------------------------------------------------------
    @property
    def nm_tuple(self) -> tuple[int, int]:
        """``(N, M)`` of the NM tier."""
        return parse_nm(self.nm)

    @property
    def pattern_nm(self) -> tuple[int, int] | None:
        """``(N, M)`` when ``pattern`` is an N:M string, else ``None``."""
        if self.pattern in ("unstructured", "hybrid"):
            return None
        return parse_nm(self.pattern)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples as lists) that :meth:`from_dict` turns back into an equal config.

        Loading attributes (``use_kernels``) are left out: they describe how one ``from_pretrained`` call
        loads the model, not the model, so a saved checkpoint does not carry them.
        """
        out = copy.deepcopy(
            {f.name: getattr(self, f.name) for f in fields(self) if f.name not in LOADING_ATTRIBUTES}
        )
        out["tier_ratios"] = list(out["tier_ratios"])
        return out

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Build a config from :meth:`to_dict` output; unknown keys raise unless ``return_unused_kwargs``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown and not return_unused_kwargs:
            raise ConfigError(f"Unknown HybridSparseConfig field(s): {', '.join(unknown)}.")
        config = cls(**{k: v for k, v in config_dict.items() if k in known})
        extra = {k: v for k, v in config_dict.items() if k not in known}
        for key in list(kwargs):
            if key in known:
                setattr(config, key, kwargs.pop(key))
        config.__post_init__()
        if return_unused_kwargs:
            extra.update(kwargs)
            return config, extra
        return config

    def get_loading_attributes(self) -> dict[str, Any]:
        """Attributes a ``from_pretrained`` call may override on a saved config (transformers convention)."""
        return {"use_kernels": self.use_kernels}

    def to_json_string(self, use_diff: bool = True) -> str:  # noqa: D102 - same as transformers
        import json

        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


@functools.cache
def _field_kinds() -> dict[str, str]:
    hints = typing.get_type_hints(HybridSparseConfig)
    kinds = {}
    for f in fields(HybridSparseConfig):
        tp = hints[f.name]
        if f.name == "tier_ratios":
            kinds[f.name] = "ratios"
        elif f.name in ("targets", "ignore"):
            kinds[f.name] = "names"
        elif tp is bool:
            kinds[f.name] = "bool"
        elif tp is int:
            kinds[f.name] = "int"
        elif tp is float:
            kinds[f.name] = "float"
        elif tp is str:
            kinds[f.name] = "str"
        else:
            kinds[f.name] = "str?"  # str | None
    return kinds


def _as_int(name: str, value: Any) -> int:
    integral = isinstance(value, int) or (
        isinstance(value, float) and math.isfinite(value) and value.is_integer()
    )
    if isinstance(value, bool) or not integral:
        raise ConfigError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    return float(value)


def register() -> None:
    """Register the config with transformers (idempotent)."""
    from transformers.quantizers import auto
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config

    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not HybridSparseConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(HybridSparseConfig)
    # let from_pretrained(quantization_config=HybridSparseConfig(use_kernels=True)) set loading attributes
    types = getattr(auto, "LOADING_ATTRIBUTES_CONFIG_TYPES", None)
    if isinstance(types, tuple) and HybridSparseConfig not in types:
        auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*types, HybridSparseConfig)
