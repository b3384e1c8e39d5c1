"""Arguments shared by the commands; the recipe flags are derived from :class:`HybridSparseConfig`'s fields.

Every field of the config whose metadata does not say ``"recipe": False`` becomes a flag of the same
name, with the field's help text and default, so every command that prunes accepts every recipe field
and the flags cannot drift from the config. Flags keep the config's types, except:

* ``--tier_ratios 0.35,0.45,0.20`` (comma-separated);
* ``--targets`` / ``--ignore``: comma-separated module names or suffixes, or ``re:REGEX`` for one regex.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from typing import Any

from ..config import HybridSparseConfig
from ..errors import ConfigError


@dataclass
class ModelArguments:
    """Which model to load."""

    model: str = field(
        default="smollm2",
        metadata={
            "help": "Model folder, Hub id, .gguf file, or 'smollm2' (the embedded SmolLM2-135M-Instruct)."
        },
    )
    dtype: str = field(
        default="float32", metadata={"help": "Weights dtype: float32, bfloat16, float16 or auto."}
    )
    device_map: str | None = field(default=None, metadata={"help": "accelerate device_map, e.g. 'auto'."})


_LIST_FIELDS = ("targets", "ignore")


def _recipe_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(HybridSparseConfig) if f.metadata.get("recipe", True)]


def _flag(f: dataclasses.Field, hint: Any) -> tuple[str, Any, dataclasses.Field]:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    meta = {k: v for k, v in f.metadata.items() if k in ("help", "choices")}
    if f.name == "tier_ratios":
        return f.name, str, field(default=",".join(f"{r:g}" for r in default), metadata=meta)
    if f.name in _LIST_FIELDS:
        text = ",".join(default) if isinstance(default, list) else default
        return f.name, str | None, field(default=text, metadata=meta)
    return f.name, hint, field(default=default, metadata=meta)


def _make_recipe_arguments() -> type:
    hints = typing.get_type_hints(HybridSparseConfig)
    cls = dataclasses.make_dataclass("RecipeArguments", [_flag(f, hints[f.name]) for f in _recipe_fields()])
    cls.__module__ = __name__
    cls.__doc__ = "The pruning recipe: one flag per HybridSparseConfig field."
    return cls


RecipeArguments = _make_recipe_arguments()


def _names(text: str | None) -> list[str] | str | None:
    if text is None:
        return None
    if text.startswith("re:"):
        return text[3:]
    return [t.strip() for t in text.split(",") if t.strip()]


def recipe_from_args(args: Any, **overrides: Any) -> HybridSparseConfig:
    """The validated :class:`HybridSparseConfig` that parsed ``RecipeArguments`` describe (plus ``overrides``)."""
    values = {f.name: getattr(args, f.name) for f in _recipe_fields()}
    try:
        values["tier_ratios"] = tuple(float(x) for x in str(values["tier_ratios"]).split(","))
    except ValueError:
        raise ConfigError(
            f"--tier_ratios {values['tier_ratios']!r} is not three comma-separated numbers."
        ) from None
    values["targets"] = _names(values["targets"])
    values["ignore"] = _names(values["ignore"]) or []
    values.update(overrides)
    return HybridSparseConfig(**values)


@dataclass
class CalibrationArguments:
    """The calibration data of the recipe."""

    calib: str = field(
        default="wiki_offline",
        metadata={
            "help": "Calibration data: a name (wiki_offline, wikitext2, c4, squad, gsm8k), a NAME:WEIGHT,... "
            "mixture, a Hub dataset id (owner/name), a dataset folder or a .txt/.jsonl/.json/.parquet/.csv file."
        },
    )
    calib_split: str = field(default="train", metadata={"help": "Split of a Hub dataset or dataset folder."})
    text_column: str = field(default="text", metadata={"help": "Column holding the calibration text."})
    chat_template: bool = field(
        default=False,
        metadata={"help": "Render the chat 'messages' column (or --text_column) with the chat template."},
    )
    no_special_tokens: bool = field(
        default=False,
        metadata={"help": "Tokenize without the tokenizer's BOS (the reference loaders keep it)."},
    )

    def calibration_set(self) -> Any:
        """The :class:`CalibrationSet` these flags describe (plain name when nothing else is set)."""
        from ..data.calibration import CalibrationSet

        spec = CalibrationSet(
            self.calib, self.calib_split, self.text_column, self.chat_template, not self.no_special_tokens
        )
        return self.calib if spec == CalibrationSet(self.calib) else spec


def _make_distillation_arguments() -> type:
    """``--distill``, ``--teacher`` and one ``--distill_<field>`` flag per :class:`DistillationConfig` field."""
    from ..training.distill import DistillationConfig

    own = [
        (
            "distill",
            bool,
            field(
                default=False,
                metadata={
                    "help": "Fine-tune against a dense teacher (progressive: the starting model, or --teacher)."
                },
            ),
        ),
        ("teacher", str | None, field(default=None, metadata={"help": "Teacher model (same tokenizer)."})),
    ]
    derived = [
        (f"distill_{f.name}", float, field(default=f.default, metadata={"help": f.metadata["help"]}))
        for f in dataclasses.fields(DistillationConfig)
    ]

    def distillation_config(self) -> DistillationConfig | None:
        """The :class:`DistillationConfig` these flags describe (``None`` without ``--distill``)."""
        if not self.distill:
            return None
        return DistillationConfig(
            **{f.name: getattr(self, f"distill_{f.name}") for f in dataclasses.fields(DistillationConfig)}
        )

    cls = dataclasses.make_dataclass(
        "DistillationArguments", own + derived, namespace={"distillation_config": distillation_config}
    )
    cls.__module__ = __name__
    cls.__doc__ = "Distillation from a dense teacher during fine-tuning."
    return cls


DistillationArguments = _make_distillation_arguments()


def say(text: str) -> None:
    """Command output for the user (tables, results): stdout, not logging."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def preflight(model: str, seqlens: tuple[int, ...] = (), calib: Any = None, save: str | None = None) -> None:
    """Check what can be checked before minutes of loading: the data names, the save target, sequence lengths."""
    from types import SimpleNamespace

    from ..checkpoint.saving import check_target
    from ..data.calibration import check_seqlen, check_source
    from ..models import load_config

    if calib is not None:
        check_source(calib)
    if save:
        check_target(save)
    config = SimpleNamespace(config=load_config(model))
    for seqlen in seqlens:
        check_seqlen(config, seqlen)
