"""Keeping the sparsity through training: `SparsityMaskCallback` and the drop-in `SparseTrainer`.

Three guards, so nothing in the optimizer path can revive a pruned weight:

1. a gradient hook on every trainable pruned parameter multiplies its gradient by the mask as it is
   computed (before accumulation, clipping and DDP's all-reduce), so pruned weights add nothing to
   the gradient norm and Adam's moments for them stay zero;
2. just before each optimizer step the gradients are masked again (covers wrappers that bypass
   tensor hooks, e.g. FSDP's flat parameters);
3. right after each optimizer step the weights are re-masked (covers weight decay and anything else).

At the end of training every pruned weight is checked to be exactly zero and the result is logged.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ..checkpoint.reader import Checkpoint
from ..engine.discovery import find_decoder_blocks, find_targets
from ..errors import ConfigError, SparsityError
from ..logs import get_logger
from ..state import ParamSparsity, iter_sparse_params, set_param_state
from .distill import DistillationConfig, check_teacher, distillation_loss, prepare_teacher, teacher_forward

logger = get_logger(__name__)


def _local(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The mask placed like ``param``: same device, and sharded the same way for DTensor parameters."""
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # pragma: no cover
        DTensor = None  # noqa: N806
    if DTensor is not None and isinstance(param, DTensor):
        return distribute_tensor(mask.to(param.device_mesh.device_type), param.device_mesh, param.placements)
    return mask.to(param.device)


def derive_masks_from_zeros(model: nn.Module) -> int:
    """Give every linear weight inside the decoder blocks that holds zeros a mask ``weight != 0``.

    For models pruned by other tools. Returns how many parameters got a mask.
    """
    path, blocks = find_decoder_blocks(model)
    count = 0
    for i, block in enumerate(blocks):
        for t in find_targets(block, f"{path}.{i}", None, ["lm_head"]):
            param = t.param
            if param.device.type == "meta" or not bool((param == 0).any()):
                continue
            set_param_state(
                t.module,
                t.param_name,
                ParamSparsity(
                    mask=(param.detach() != 0),
                    tier_map=None,
                    pattern="unstructured",
                    method="zeros",
                    transposed=t.transposed,
                ),
            )
            count += 1
    return count


class SparsityMaskCallback(TrainerCallback):
    """Holds the masks of a pruned model through training; usable with any ``transformers`` trainer (e.g. TRL's).

    Args:
        derive_from_zeros: when the model carries no sparsity state, build masks from its zero weights
            (with a warning) instead of raising.
        allow_dense: accept a model with neither state nor zeros (then the callback does nothing).
    """

    def __init__(self, derive_from_zeros: bool = True, allow_dense: bool = False) -> None:
        self.derive_from_zeros = derive_from_zeros
        self.allow_dense = allow_dense
        self.entries: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, param, mask placed like it)
        self._handles: list[Any] = []
        self.verified: dict[str, float] | None = None  # set by a successful end-of-training check

    # -- set-up -------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Collect masks from ``model``, check shapes, install gradient hooks, zero pruned weights.

        Call it again after wrapping (FSDP replaces parameters): entries always follow the current ones.
        """
        self.detach()
        found = list(iter_sparse_params(model))
        if not found and self.derive_from_zeros:
            n = derive_masks_from_zeros(model)
            if n:
                logger.warning(
                    f"The model carries no sparsity state; masks were derived from the zeros of {n} weights. "
                    "Weights that are zero by chance are treated as pruned."
                )
            found = list(iter_sparse_params(model))
        if not found:
            if self.allow_dense:
                logger.warning("No sparsity state and no zero weights: training the model dense.")
                return
            raise SparsityError(
                "The model has no sparsity state and no zero weights to derive masks from: prune it first with "
                "apply_hybrid_sparsity (or load a pruned checkpoint), or pass allow_dense=True to train it dense."
            )
        for name, module, pname, state in found:
            param = getattr(module, pname)
            if tuple(state.mask.shape) != tuple(param.shape):
                raise SparsityError(
                    f"{name}.{pname}: the mask has shape {list(state.mask.shape)} but the parameter has "
                    f"{list(param.shape)} (was the model resized after pruning?). Prune it again."
                )
            mask = _local(state.mask, param)
            self.entries.append((f"{name}.{pname}", param, mask))
            if param.requires_grad:
                self._handles.append(param.register_hook(lambda g, m=mask: g * m.to(g.dtype)))
        self.apply_masks()

    def detach(self) -> None:
        """Remove the gradient hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.entries.clear()

    # -- the guards ---------------------------------------------------------------------------
    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of pruned weights."""
        for _, param, mask in self.entries:
            if param.grad is not None:
                param.grad.mul_(mask.to(param.grad.dtype))

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned weights."""
        for _, param, mask in self.entries:
            param.mul_(mask.to(param.dtype))

    @torch.no_grad()
    def violations(self) -> dict[str, int]:
        """``{parameter: number of pruned weights that are not zero}`` (empty when the sparsity is intact)."""
        bad = {}
        for name, param, mask in self.entries:
            n = int(((param != 0) & ~mask.bool()).sum())
            if n:
                bad[name] = n
        return bad

    # -- TrainerCallback events ---------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.attach(model)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.mask_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.apply_masks()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.entries:
            return
        bad = self.violations()
        if bad:
            raise SparsityError(
                f"Sparsity was lost during training in {len(bad)} parameters: {dict(list(bad.items())[:3])}"
            )
        kept = sum(int(m.sum()) for _, _, m in self.entries)
        total = sum(m.numel() for _, _, m in self.entries)
        self.verified = {"sparsity_verified_params": len(self.entries), "sparsity": 1 - kept / total}
        logger.info(
            f"Sparsity intact after training: {len(self.entries)} masked parameters, "
            f"{1 - kept / total:.2%} of their weights are zero as pruned."
        )
        self.detach()


class SparseTrainer(Trainer):
    """``transformers.Trainer`` that keeps every pruned weight at zero (see :class:`SparsityMaskCallback`).

    Extra keyword arguments: ``derive_masks_from_zeros`` (default ``True``) and ``allow_dense``
    (default ``False``), passed to the callback; ``teacher_model`` (e.g. the unpruned model, on any
    device or offloaded) and ``distillation`` (a :class:`DistillationConfig` or its dict; defaults to KL on
    logits at T=2) make training steps learn from the teacher (evaluation keeps the plain loss);
    ``teacher_tokenizer``, when given, must map tokens to the same ids as the trainer's ``processing_class``.
    Resuming from a checkpoint whose saved masks differ from the model's raises before training continues.
    """

    def __init__(
        self,
        *args: Any,
        derive_masks_from_zeros: bool = True,
        allow_dense: bool = False,
        teacher_model: nn.Module | None = None,
        distillation: DistillationConfig | dict | None = None,
        teacher_tokenizer: Any = None,
        **kwargs: Any,
    ):
        self.sparsity_callback = SparsityMaskCallback(
            derive_from_zeros=derive_masks_from_zeros, allow_dense=allow_dense
        )
        if isinstance(distillation, dict):
            distillation = DistillationConfig.from_dict(distillation)
        if distillation is not None and teacher_model is None:
            raise ConfigError("`distillation` needs a `teacher_model` (e.g. the unpruned model).")
        self.teacher_model = teacher_model
        self.distillation = distillation or (DistillationConfig() if teacher_model is not None else None)
        self._distill_sums: dict[str, float] = {}
        self._distill_steps = 0
        # Trainer's own parameters, positional or not, so `callbacks` can be extended wherever it was given
        bound = _TRAINER_SIGNATURE.bind(self, *args, **kwargs)
        bound.arguments["callbacks"] = list(bound.arguments.get("callbacks") or []) + [self.sparsity_callback]
        super().__init__(*bound.args[1:], **bound.kwargs)
        # fail on bad input before any training work starts
        self.sparsity_callback.attach(self.model)
        if self.teacher_model is not None:
            check_teacher(
                self.model,
                self.teacher_model,
                self.distillation,
                getattr(self, "processing_class", None),
                teacher_tokenizer,
            )
            prepare_teacher(self.teacher_model)
            # our loss is a per-batch mean: let Trainer scale it for gradient accumulation
            self.model_accepts_loss_kwargs = False
            if hasattr(self, "loss_is_scaled_for_ga"):
                self.loss_is_scaled_for_ga = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``Trainer.compute_loss``, or the distillation loss on training steps when a teacher is set."""
        if self.teacher_model is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        cfg = self.distillation
        hidden = cfg.hidden_weight > 0
        fed = {k: v for k, v in inputs.items() if k != "num_items_in_batch"}
        if not cfg.ce_weight:
            fed.pop("labels", None)  # no cross-entropy to compute
        outputs = model(**fed, output_hidden_states=True) if hidden else model(**fed)
        teacher_out = teacher_forward(self.teacher_model, inputs, hidden)
        loss, parts = distillation_loss(outputs, teacher_out, inputs, cfg)
        for k, v in parts.items():
            self._distill_sums[k] = self._distill_sums.get(k, 0.0) + v
        self._distill_steps += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """``Trainer.log``, adding the mean distillation parts (``distill_kl``, ...) since the last log."""
        if self._distill_steps and "loss" in logs:
            for k, v in self._distill_sums.items():
                logs[f"distill_{k}"] = round(v / self._distill_steps, 4)
            self._distill_sums, self._distill_steps = {}, 0
        super().log(logs, *args, **kwargs)

    def train(self, *args: Any, **kwargs: Any):
        """``Trainer.train``; the end-of-training sparsity check is added to the returned metrics and
        logged like the other training metrics (console, ``report_to`` integrations, log history)."""
        self.sparsity_callback.verified = None
        output = super().train(*args, **kwargs)
        verified = self.sparsity_callback.verified
        if verified is not None:
            output.metrics.update(verified)
            self.log(dict(verified))
        return output

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        check_checkpoint_masks(self.model, resume_from_checkpoint)
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)


_TRAINER_SIGNATURE = inspect.signature(Trainer.__init__)
# `inspect.signature(SparseTrainer)` shows Trainer's parameters followed by this class's own keyword-only ones
SparseTrainer.__init__.__signature__ = _TRAINER_SIGNATURE.replace(
    parameters=[
        p for p in _TRAINER_SIGNATURE.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    + [
        inspect.Parameter("derive_masks_from_zeros", inspect.Parameter.KEYWORD_ONLY, default=True),
        inspect.Parameter("allow_dense", inspect.Parameter.KEYWORD_ONLY, default=False),
        inspect.Parameter("teacher_model", inspect.Parameter.KEYWORD_ONLY, default=None),
        inspect.Parameter("distillation", inspect.Parameter.KEYWORD_ONLY, default=None),
        inspect.Parameter("teacher_tokenizer", inspect.Parameter.KEYWORD_ONLY, default=None),
    ]
)


def check_checkpoint_masks(model: nn.Module, checkpoint_dir: str) -> None:
    """Raise :class:`SparsityError` if the masks saved in ``checkpoint_dir`` differ from ``model``'s."""
    files = sorted(str(p) for p in Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        return
    with Checkpoint(files) as ckpt:
        if ckpt.doc is None:
            return  # a checkpoint without sparsity metadata (e.g. adapter-only): nothing to compare
        mine = {f"{n}.{p}": s for n, _, p, s in iter_sparse_params(model)}
        # adapter-wrapped models name modules differently: compare by suffix
        for key in ckpt.doc["modules"]:
            match = mine.get(key) or next(
                (s for k, s in mine.items() if k.endswith("." + key) or key.endswith("." + k)), None
            )
            if match is None:
                raise SparsityError(f"The checkpoint has a mask for {key} but the model has none there.")
            saved = ckpt.mask(key)
            if not torch.equal(saved, match.mask.cpu()):
                raise SparsityError(
                    f"{key}: the checkpoint's mask differs from the model's ({int((saved != match.mask.cpu()).sum())} "
                    "entries); resume with the model the checkpoint was trained from."
                )
