"""The on-disk sparsity format (version 1): bit-packed masks and header metadata.

Inside every ``*.safetensors`` file of a saved model:

* the weights, as usual (pruned weights are zeros, so any loader gets a working dense model);
* for each pruned parameter ``P`` (e.g. ``model.layers.0.mlp.down_proj.weight``) a ``uint8`` tensor
  ``hybrid_sparse_mask.<i>`` (named in P's metadata entry, opaque so that no checkpoint key
  conversion of transformers renames it): its keep-mask in the parameter's layout, flattened
  row-major, 8 entries per byte, least significant bit first;
* under the header metadata key ``"hybrid_sparse"`` a JSON document::

      {"format_version": 1,
       "recipe": {... HybridSparseConfig.to_dict() ...},
       "modules": {"<P>": {"shape": [...], "transposed": false, "pattern": "hybrid", "method": "wanda",
                           "block_size": 16, "nm": "2:4", "topk_per_block": 15,
                           "numel": 331776, "kept": 194688, "mask": "hybrid_sparse_mask.00000",
                           "values": null,
                           "tier_map": {"shape": [36, 36], "data": "<base64>"} | null,
                           "digest": "<sha256 of this entry>"}},
       "digest": "<sha256 of the document>"}

  A digest is the sha256 (hex) of its object without the ``"digest"`` key, written as JSON with sorted
  keys and no spaces;
* under ``"hybrid_sparse_masks"`` the JSON ``{"hybrid_sparse_mask.<i>": "<P>"}``, so that a mask whose
  entry was removed from the document still names its module.

  Tier maps are packed 4 codes per byte (2 bits each, least significant first); a ``hybrid`` entry has
  one, any other pattern has ``null``. Every shard carries the same document, so any one file describes
  the model; a loader reads every shard's copy and refuses a checkpoint whose copies differ, whose
  digests do not match, or that holds a mask tensor no entry names.

Compressed layout (``save_pretrained(..., compressed=True)``): the tensor stored under ``P`` itself is
1-D, the kept values in row-major order of the parameter (so ``weight[mask] = values``), and the entry
says ``"values": "<P>"``; for hybrid layers the mask holds only the bits of weights in non-DENSE
blocks (``"mask_scope": "nondense"``; DENSE blocks are all kept). Only this package can load such a
checkpoint: plain transformers stops with a size-mismatch error (it never loads random weights unless
told to ignore mismatched sizes). The plain layout loads anywhere.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from typing import Any

import numpy as np
import torch

from ..bits import pack_2bit, unpack_2bit_bytes
from ..config import parse_nm
from ..errors import ConfigError, StorageError
from ..pruning.patterns import TOPK

FORMAT_VERSION = 1
METADATA_KEY = "hybrid_sparse"
INDEX_KEY = "hybrid_sparse_masks"
MASK_PREFIX = "hybrid_sparse_mask."


def encode_tier_map(tiers: torch.Tensor) -> dict[str, Any]:
    """Tier map -> ``{"shape": [...], "data": base64}`` (2 bits per code, row-major)."""
    packed = pack_2bit(tiers.detach().reshape(-1).cpu())
    return {"shape": list(tiers.shape), "data": base64.b64encode(packed.numpy().tobytes()).decode("ascii")}


def decode_tier_map(entry: Any, where: str) -> torch.Tensor:
    """Inverse of :func:`encode_tier_map`, validating shape, size and code range."""
    if not isinstance(entry, dict) or set(entry) != {"shape", "data"}:
        raise StorageError(f"{where}: tier_map must be an object with 'shape' and 'data'.")
    shape = _shape(entry["shape"], f"{where}.tier_map.shape")
    if not isinstance(entry["data"], str):
        raise StorageError(f"{where}: tier_map data is not a base64 string.")
    try:
        raw = base64.b64decode(entry["data"].encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise StorageError(f"{where}: tier_map data is not valid base64.") from None
    n = math.prod(shape)
    if len(raw) != (n + 3) // 4:
        raise StorageError(f"{where}: tier_map holds {len(raw)} bytes, shape {shape} needs {(n + 3) // 4}.")
    # NumPy, then one from_numpy: headers are parsed inside from_pretrained's meta-device context
    codes = unpack_2bit_bytes(raw, n)
    if n and int(codes.max()) > TOPK:
        raise StorageError(f"{where}: tier code {int(codes.max())} is out of range (0..{TOPK}).")
    return torch.from_numpy(codes.astype(np.int8).reshape(shape))


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= 4
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**40 for v in value)
    ):
        raise StorageError(f"{where}: expected a list of 1-4 non-negative integers, got {value!r:.80}.")
    return tuple(value)


_FIELDS = {
    "shape": list,
    "transposed": bool,
    "pattern": str,
    "method": str,
    "block_size": int,
    "nm": str,
    "topk_per_block": int,
    "numel": int,
    "kept": int,
    "mask": str,
    "tier_map": (dict, type(None)),
}


def digest(obj: dict[str, Any]) -> str:
    """sha256 (hex) of ``obj`` without its ``"digest"`` key, as JSON with sorted keys and no spaces."""
    body = {k: v for k, v in obj.items() if k != "digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def encode_metadata(recipe: dict[str, Any], modules: dict[str, dict[str, Any]]) -> str:
    """The JSON document stored under :data:`METADATA_KEY`: each entry and the whole carry a digest."""
    modules = {k: e | {"digest": digest(e)} for k, e in modules.items()}
    doc = {"format_version": FORMAT_VERSION, "recipe": recipe, "modules": modules}
    return json.dumps(doc | {"digest": digest(doc)}, separators=(",", ":"))


def encode_mask_index(modules: dict[str, dict[str, Any]]) -> str:
    """The JSON stored under :data:`INDEX_KEY`: ``{mask tensor: module}``, to name a module whose entry is gone."""
    return json.dumps({e["mask"]: k for k, e in modules.items()}, separators=(",", ":"))


def parse_metadata(text: Any) -> dict[str, Any]:
    """Parse and validate the header document; raises :class:`StorageError` for anything malformed.

    Returns ``{"format_version", "recipe", "modules"}`` with each module's ``shape`` as a tuple and its
    ``tier_map`` decoded to an int8 tensor (or ``None``).
    """
    if not isinstance(text, str):
        raise StorageError("hybrid_sparse metadata is not a string.")
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise StorageError(f"hybrid_sparse metadata is not valid JSON: {str(exc)[:100]}") from None
    if not isinstance(doc, dict):
        raise StorageError("hybrid_sparse metadata is not a JSON object.")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise StorageError(
            f"hybrid_sparse format version {version!r} is not supported (this package reads {FORMAT_VERSION}); "
            "upgrade hf-hybrid-sparse."
        )
    recipe, modules = doc.get("recipe"), doc.get("modules")
    if not isinstance(recipe, dict) or not isinstance(modules, dict):
        raise StorageError("hybrid_sparse metadata needs 'recipe' and 'modules' objects.")
    for name, entry in modules.items():
        if isinstance(entry, dict) and entry.get("digest") != digest(entry):
            raise StorageError(
                f"{name}: its metadata entry does not match its digest; it was edited after saving. Save the model again."
            )
    parsed = {}
    for name, entry in modules.items():
        if not isinstance(entry, dict):
            raise StorageError(f"{name}: module entry is not an object.")
        for key, kind in _FIELDS.items():
            if key not in entry:
                raise StorageError(f"{name}: missing field {key!r}.")
            value = entry[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise StorageError(f"{name}: field {key!r} has the wrong type ({type(value).__name__}).")
        shape = _shape(entry["shape"], f"{name}.shape")
        if len(shape) not in (2, 3):
            raise StorageError(f"{name}: a pruned parameter must be 2-D or 3-D, got shape {list(shape)}.")
        if entry["numel"] != math.prod(shape) or not 0 <= entry["kept"] <= entry["numel"]:
            raise StorageError(f"{name}: numel/kept do not fit shape {list(shape)}.")
        if entry["block_size"] < 1 or not 0 <= entry["topk_per_block"] <= entry["block_size"] ** 2:
            raise StorageError(f"{name}: block_size/topk_per_block out of range.")
        try:
            parse_nm(entry["nm"])
            if entry["pattern"] not in ("unstructured", "hybrid"):
                parse_nm(entry["pattern"])
        except ConfigError as exc:
            raise StorageError(f"{name}: {exc}") from None
        tier_map = None
        if entry["tier_map"] is not None:
            tier_map = decode_tier_map(entry["tier_map"], name)
            bs = entry["block_size"]
            logical = shape if not entry["transposed"] else shape[:-2] + (shape[-1], shape[-2])
            expected = logical[:-2] + (logical[-2] // bs, logical[-1] // bs)
            if tuple(tier_map.shape) != expected:
                raise StorageError(
                    f"{name}: tier map shape {list(tier_map.shape)} does not match {list(expected)}."
                )
        if (entry["pattern"] == "hybrid") != (tier_map is not None):
            raise StorageError(
                f"{name}: pattern {entry['pattern']!r} with tier_map={entry['tier_map'] and '...'}; a hybrid entry has a tier map, others none."
            )
        if entry.get("mask_scope", "all") not in ("all", "nondense"):
            raise StorageError(f"{name}: mask_scope must be 'all' or 'nondense'.")
        if entry.get("mask_scope", "all") == "nondense" and tier_map is None:
            raise StorageError(f"{name}: a 'nondense' mask needs a tier map.")
        values = entry.get("values")
        if values is not None and values != name:
            raise StorageError(f"{name}: 'values' must be null or name the entry's own tensor {name!r}.")
        if not entry["mask"].startswith(MASK_PREFIX):
            raise StorageError(f"{name}: 'mask' must name a {MASK_PREFIX}* tensor.")
        parsed[name] = dict(entry, shape=shape, tier_map=tier_map, values=values)
    return {
        "format_version": version,
        "recipe": recipe,
        "modules": parsed,
        "digest_ok": doc.get("digest") == digest(doc),
    }
