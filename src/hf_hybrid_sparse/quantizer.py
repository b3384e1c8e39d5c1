"""`HybridSparseHfQuantizer`: the transformers hook that saves and restores the sparsity state.

Registered for ``quant_method="hybrid_sparse"`` beside :class:`HybridSparseConfig`.

* Saving: ``model.save_pretrained`` asks the quantizer for the state dict and header metadata; it
  adds each pruned parameter's bit-packed mask and the tier maps + recipe (format in
  :mod:`hf_hybrid_sparse.serialization`). Weights stay ordinary tensors with zeros.
* Loading: ``from_pretrained`` builds the quantizer from ``config.json``; before the weights load it
  notes the checkpoint files (and tells transformers the mask tensors are expected extras), after
  they load it reads the header and masks, checks them against the weights, and puts a
  :class:`~hf_hybrid_sparse.state.ParamSparsity` on every pruned module.

Nothing is quantized: the weights keep their dtype and remain trainable (full fine-tuning and PEFT).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer

from .config import QUANT_METHOD, HybridSparseConfig, parse_nm
from .errors import ConfigError
from .patterns import check_hybrid
from .serialization import (
    MASK_PREFIX,
    METADATA_KEY,
    VALUES_PREFIX,
    StorageError,
    encode_metadata,
    encode_tier_map,
    pack_bits,
    parse_metadata,
    unpack_bits,
)
from .state import ParamSparsity, iter_sparse_params, set_param_state


class HybridSparseHfQuantizer(HfQuantizer):
    """Saves/restores masks, tier maps and the recipe of a pruned model (see module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: HybridSparseConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_files: list[str] | None = None
        self.compressed = False  # set for the duration of a save_pretrained(..., compressed=True)

    # -- loading ------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        self.checkpoint_files = list(checkpoint_files or [])
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
        ignore.add("^" + MASK_PREFIX.replace(".", r"\."))
        ignore.add("^" + VALUES_PREFIX.replace(".", r"\."))
        model._keys_to_ignore_on_load_unexpected = ignore
        # a compressed checkpoint has no dense tensor for pruned weights: they are rebuilt after loading
        doc = read_metadata([f for f in self.checkpoint_files if str(f).endswith(".safetensors")])
        if doc is not None:
            missing = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
            missing |= {
                "^" + re.escape(k) + "$" for k, e in doc["modules"].items() if e["values"] is not None
            }
            model._keys_to_ignore_on_load_missing = missing
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        files = [f for f in (self.checkpoint_files or []) if str(f).endswith(".safetensors")]
        if not files:
            raise StorageError(
                "config.json declares quant_method='hybrid_sparse' but no safetensors checkpoint was loaded; "
                "the sparsity state can only be restored from safetensors files."
            )
        restore_state(model, files)
        _wrap_save(model)
        if getattr(self.quantization_config, "use_kernels", False):
            from .linear import convert_to_hybrid_kernels

            convert_to_hybrid_kernels(model)
        return model

    # -- saving -------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model):
        from .linear import HybridSparseLinear

        if any(isinstance(m, HybridSparseLinear) for m in model.modules()):
            raise StorageError(
                "The model holds packed HybridSparseLinear layers; call convert_to_dense(model) before saving."
            )
        state_dict = model.state_dict()
        modules = {}
        if self.compressed and any(getattr(m, p).dim() == 3 for _, m, p, _ in iter_sparse_params(model)):
            raise StorageError(
                "compressed=True does not support fused MoE expert weights yet (transformers re-splits them per "
                "expert on save); save this model with the plain layout."
            )
        for index, (name, module, pname, state) in enumerate(iter_sparse_params(model)):
            key = f"{name}.{pname}" if name else pname
            mask_key = f"{MASK_PREFIX}{index:05d}"
            param = getattr(module, pname)
            modules[key] = {
                "shape": list(param.shape),
                "transposed": state.transposed,
                "pattern": state.pattern,
                "method": state.method,
                "block_size": state.block_size,
                "nm": state.nm,
                "topk_per_block": state.topk_per_block,
                "numel": state.mask.numel(),
                "kept": int(state.mask.sum()),
                "mask": mask_key,
                "values": None,
                "tier_map": None if state.tier_map is None else encode_tier_map(state.tier_map),
            }
            if self.compressed and state.tier_map is not None:
                # DENSE blocks are all kept: their mask bits carry nothing, store only the others
                informative = _non_dense(state.tier_map, state.block_size, state.transposed, param.shape)
                state_dict[mask_key] = pack_bits(state.mask.cpu()[informative])
                modules[key]["mask_scope"] = "nondense"
            else:
                state_dict[mask_key] = pack_bits(state.mask)
            if self.compressed:
                values_key = f"{VALUES_PREFIX}{index:05d}"
                weight = state_dict.pop(key)
                state_dict[values_key] = weight[state.mask.to(weight.device)].contiguous()
                modules[key]["values"] = values_key
        recipe = self.quantization_config.to_dict()
        return state_dict, {METADATA_KEY: encode_metadata(recipe, modules)}

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # full fine-tuning of a pruned model is the point (SparseTrainer keeps the masks)
        return True


def _non_dense(tier_map: torch.Tensor, block_size: int, transposed: bool, shape) -> torch.Tensor:
    """Bool tensor of the parameter's shape: True where the weight is in a non-DENSE block."""
    from .patterns import DENSE, expand_tiers

    tiers = tier_map.cpu()
    per = (
        torch.stack([expand_tiers(t, block_size) for t in tiers])
        if tiers.dim() == 3
        else expand_tiers(tiers, block_size)
    )
    per = per.transpose(-1, -2) if transposed else per
    if tuple(per.shape) != tuple(shape):
        raise StorageError(f"tier map does not cover a parameter of shape {list(shape)}.")
    return per != DENSE


def _tensor(
    key: str, what: str, tensor_key: str, where: dict[str, str], handles: dict[str, Any]
) -> torch.Tensor:
    """Read ``tensor_key`` from whichever checkpoint file holds it (files opened once, kept in ``handles``)."""
    from safetensors import safe_open

    if tensor_key not in where:
        raise StorageError(f"{key}: its {what} tensor {tensor_key!r} is missing from the checkpoint.")
    path = where[tensor_key]
    if path not in handles:
        handles[path] = safe_open(path, framework="pt")
    return handles[path].get_tensor(tensor_key)


def load_mask(key: str, entry: dict, where: dict[str, str], handles: dict[str, Any]) -> torch.Tensor:
    """The full keep-mask of a parsed metadata ``entry`` (either mask layout), in the parameter's shape."""
    packed = _tensor(key, "mask", entry["mask"], where, handles)
    if entry.get("mask_scope", "all") != "nondense":
        return unpack_bits(packed, entry["shape"])
    if entry["tier_map"] is None:
        raise StorageError(f"{key}: a 'nondense' mask needs a tier map.")
    informative = _non_dense(entry["tier_map"], entry["block_size"], entry["transposed"], entry["shape"])
    mask = torch.ones(entry["shape"], dtype=torch.bool)
    mask[informative] = unpack_bits(packed, (int(informative.sum()),))
    return mask


def read_metadata(files: list[str], where: dict[str, str] | None = None) -> dict | None:
    """The parsed header document of the first of ``files`` that has one (``None`` if none has).

    With ``where``, also record which file holds each mask/values tensor.
    """
    from safetensors import safe_open

    doc = None
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                if doc is None and METADATA_KEY in meta:
                    doc = parse_metadata(meta[METADATA_KEY])
                    if where is None:
                        return doc
                if where is not None:
                    for key in fh.keys():  # noqa: SIM118 - safe_open handles are not mappings
                        if key.startswith((MASK_PREFIX, VALUES_PREFIX)):
                            where[key] = str(path)
        except StorageError:
            raise
        except Exception as exc:  # truncated or corrupted file
            raise StorageError(f"{path}: cannot read the safetensors file ({exc}).") from None
    return doc


def restore_state(model: torch.nn.Module, files: list[str]) -> None:
    """Read masks and tier maps from safetensors ``files``, verify them, attach them to ``model``."""
    where: dict[str, str] = {}
    doc = read_metadata(files, where)
    if doc is None:
        raise StorageError(
            f"The checkpoint declares quant_method='{QUANT_METHOD}' but its safetensors headers hold no "
            f"'{METADATA_KEY}' metadata; the files were not written by hf-hybrid-sparse or were edited."
        )
    handles: dict[str, Any] = {}
    try:
        for key, entry in doc["modules"].items():
            module_name, _, pname = key.rpartition(".")
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                raise StorageError(
                    f"{key}: the saved sparsity state names a module the model does not have."
                ) from None
            param = getattr(module, pname, None)
            if not isinstance(param, torch.nn.Parameter):
                raise StorageError(f"{key}: the model has no such parameter.")
            if tuple(param.shape) != entry["shape"]:
                raise StorageError(
                    f"{key}: the saved mask has shape {list(entry['shape'])} but the parameter has {list(param.shape)}."
                )
            mask = load_mask(key, entry, where, handles)
            if int(mask.sum()) != entry["kept"]:
                raise StorageError(
                    f"{key}: the mask keeps {int(mask.sum())} weights, the metadata says {entry['kept']}."
                )
            if entry["values"] is not None:
                _fill_from_values(key, param, mask, entry, where, handles)
            if param.device.type != "meta":
                revived = param.detach()[~mask.to(param.device)]
                if revived.numel() and bool((revived != 0).any()):
                    raise StorageError(
                        f"{key}: {int((revived != 0).sum())} weights that the mask prunes are not zero; the weights "
                        "and the mask disagree (edited or mixed-up checkpoint)."
                    )
            tiers = entry["tier_map"]
            if tiers is not None:
                _check_tiers(key, mask, tiers, entry)
            state = ParamSparsity(
                mask=mask.to(param.device if param.device.type != "meta" else "cpu"),
                tier_map=tiers,
                pattern=entry["pattern"],
                method=entry["method"],
                block_size=entry["block_size"],
                nm=entry["nm"],
                topk_per_block=entry["topk_per_block"],
                transposed=entry["transposed"],
            )
            set_param_state(module, pname, state)
    finally:
        handles.clear()


def _fill_from_values(key, param, mask, entry, where, handles) -> None:
    values = _tensor(key, "values", entry["values"], where, handles)
    if values.dim() != 1 or values.numel() != entry["kept"]:
        raise StorageError(f"{key}: {values.numel()} stored values for {entry['kept']} kept weights.")
    if param.device.type == "meta":
        raise StorageError(
            f"{key}: compressed checkpoints cannot be loaded into offloaded (meta) parameters."
        )
    dense = torch.zeros(entry["shape"], dtype=param.dtype)
    dense[mask] = values.to(param.dtype)
    with torch.no_grad():
        param.copy_(dense.to(param.device))


def _check_tiers(key: str, mask: torch.Tensor, tiers: torch.Tensor, entry: dict) -> None:
    try:
        n, m = parse_nm(entry["nm"])
    except ConfigError:
        raise StorageError(f"{key}: NM pattern {entry['nm']!r} is not valid.") from None
    bs = entry["block_size"]
    logical = mask.transpose(-1, -2) if entry["transposed"] else mask
    mats = [(logical, tiers)] if logical.dim() == 2 else list(zip(logical, tiers))
    for mat, tm in mats:
        if mat.shape[0] % bs or mat.shape[1] % bs or bs % m:
            raise StorageError(
                f"{key}: shape {list(mat.shape)} does not tile into {bs}x{bs} blocks of {n}:{m}."
            )
        problems = check_hybrid(mat, tm, bs, n, m, entry["topk_per_block"])
        if problems:
            raise StorageError(f"{key}: the mask does not obey its tier map ({problems[0]}).")


def _wrap_save(model: torch.nn.Module) -> None:
    """Make ``model.save_pretrained`` atomic (see :func:`hf_hybrid_sparse.storage.save_pretrained`)."""
    import functools

    from .storage import save_pretrained

    if "save_pretrained" not in model.__dict__ and hasattr(type(model), "save_pretrained"):
        model.save_pretrained = functools.partial(save_pretrained, model)


def attach(model: torch.nn.Module, config: HybridSparseConfig) -> bool:
    """Make ``model`` carry ``config`` and this quantizer, so ``save_pretrained`` writes the sparsity state.

    Returns ``False`` (and changes nothing) when the model is already quantized by another method.
    """
    current = getattr(model, "hf_quantizer", None)
    if current is not None and not isinstance(current, HybridSparseHfQuantizer):
        return False
    if not hasattr(model, "config"):
        return False
    model.config.quantization_config = config
    model.hf_quantizer = HybridSparseHfQuantizer(config, pre_quantized=True)
    model.quantization_method = QUANT_METHOD
    _wrap_save(model)
    return True


def register() -> None:
    """Register the quantizer with transformers (idempotent)."""
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantizer

    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not HybridSparseHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(HybridSparseHfQuantizer)
