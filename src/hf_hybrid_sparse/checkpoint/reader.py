"""Reading the sparsity state back from safetensors files: masks, tier maps, checks, header summaries.

Used by the quantizer on ``from_pretrained``, by the trainer's resume check and by ``report``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..bits import unpack_bits
from ..config import QUANT_METHOD, parse_nm
from ..errors import ConfigError, StorageError
from ..pruning.patterns import DENSE, TIER_NAMES, check_hybrid, expand_tiers
from ..state import ParamSparsity, set_param_state
from .format import MASK_PREFIX, METADATA_KEY, VALUES_PREFIX, parse_metadata


def _unpack(key: str, packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    try:
        return unpack_bits(packed, shape)
    except ValueError as exc:
        raise StorageError(f"{key}: {exc}") from None


def non_dense(tier_map: torch.Tensor, block_size: int, transposed: bool, shape) -> torch.Tensor:
    """Bool tensor of the parameter's shape: True where the weight is in a non-DENSE block."""
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
        return _unpack(key, packed, entry["shape"])
    if entry["tier_map"] is None:
        raise StorageError(f"{key}: a 'nondense' mask needs a tier map.")
    informative = non_dense(entry["tier_map"], entry["block_size"], entry["transposed"], entry["shape"])
    mask = torch.ones(entry["shape"], dtype=torch.bool)
    mask[informative] = _unpack(key, packed, (int(informative.sum()),))
    return mask


def read_metadata(files: list[str], where: dict[str, str] | None = None) -> dict | None:
    """The parsed header document of the first of ``files`` that has one (``None`` if none has).

    With ``where``, also record which file holds each mask/values tensor.
    """
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


def read_sparsity_summary(directory: str | os.PathLike) -> dict[str, Any]:
    """Recipe and per-module sparsity/tier counts of a saved model, from safetensors headers only.

    Reads no weight data, so it is fast for any model size. Raises :class:`StorageError` when the
    folder holds no hybrid-sparse metadata.
    """
    folder = Path(directory)
    files = sorted(str(p) for p in folder.glob("*.safetensors"))
    if not files:
        raise StorageError(f"{folder} contains no .safetensors files.")
    doc = read_metadata(files)
    if doc is None:
        raise StorageError(f"{folder} has no hybrid-sparse metadata (was it saved by hf-hybrid-sparse?).")
    layers = []
    totals = {name: 0 for name in TIER_NAMES.values()}
    kept = numel = 0
    for name, entry in doc["modules"].items():
        row = {
            "name": name,
            "shape": "x".join(map(str, entry["shape"])),
            "sparsity": 1 - entry["kept"] / entry["numel"],
        }
        tiers = entry["tier_map"]
        for code, tier in TIER_NAMES.items():
            count = int((tiers == code).sum()) if tiers is not None else None
            row[tier] = "" if count is None else count
            totals[tier] += count or 0
        layers.append(row)
        kept += entry["kept"]
        numel += entry["numel"]
    return {
        "recipe": doc["recipe"],
        "layers": layers,
        "tier_totals": totals,
        "overall_sparsity": 1 - kept / numel if numel else 0.0,
        "tier_maps": {name: e["tier_map"] for name, e in doc["modules"].items() if e["tier_map"] is not None},
    }
