"""Reading the sparsity state back from safetensors files: masks, tier maps, checks, header summaries.

Used by the quantizer on ``from_pretrained``, by the trainer's resume check and by ``report``. What a
load trusts it checks: every shard carries the same header document (and its digest matches), every
mask tensor belongs to exactly one entry, every mask has the entry's shape and kept count, every
pruned weight is zero, and every hybrid mask obeys its tier map with the entry's N:M and top-K.
"""

from __future__ import annotations

import contextlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from .. import native
from ..bits import check_packed, pack_bits, unpack_bits
from ..config import QUANT_METHOD, parse_nm
from ..errors import ConfigError, StorageError
from ..hostops import count_true, nonzero_bits, popcount, scatter
from ..pruning.patterns import DENSE, NM, TIER_NAMES, TOPK, check_hybrid
from ..state import ParamSparsity, set_param_state
from .format import INDEX_KEY, MASK_PREFIX, METADATA_KEY, parse_metadata

NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _unpack(key: str, packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    try:
        return unpack_bits(packed, shape)
    except ValueError as exc:
        raise StorageError(f"{key}: {exc}") from None


def non_dense(tier_map: torch.Tensor, block_size: int, transposed: bool, shape) -> torch.Tensor:
    """Bool tensor of the parameter's shape: True where the weight is in a non-DENSE block."""
    # NumPy: also called while headers are parsed inside from_pretrained's meta-device context
    blocks = tier_map.cpu().numpy() != DENSE
    *lead, rows, cols = blocks.shape
    bs = block_size
    per = np.broadcast_to(blocks[..., :, None, :, None], (*lead, rows, bs, cols, bs))
    per = per.reshape(*lead, rows * bs, cols * bs)
    per = np.swapaxes(per, -1, -2) if transposed else per
    if tuple(per.shape) != tuple(shape):
        raise StorageError(f"tier map does not cover a parameter of shape {list(shape)}.")
    return torch.from_numpy(np.ascontiguousarray(per))


class Checkpoint:
    """The parsed, cross-checked sparsity header of a set of safetensors files, and its mask tensors.

    Use as a context manager (it keeps the files open while masks are read).
    """

    def __init__(self, files: list[str]) -> None:
        self.files = [str(f) for f in files]
        self.doc: dict[str, Any] | None = None
        self.where: dict[str, str] = {}  # mask tensor -> file
        self._handles: dict[str, Any] = {}
        self._stack = contextlib.ExitStack()
        self._read()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._handles.clear()

    def _read(self) -> None:
        text, first = None, None
        without = []
        index: dict[str, str] = {}
        for path in self.files:
            try:
                with safe_open(path, framework="pt") as fh:
                    meta = fh.metadata() or {}
                    keys = list(fh.keys())
            except Exception as exc:  # truncated or corrupted file
                raise StorageError(f"{path}: cannot read the safetensors file ({exc}).") from None
            for key in keys:
                if key.startswith(MASK_PREFIX):
                    if key in self.where:
                        raise StorageError(
                            f"mask tensor {key!r} is stored twice ({self.where[key]} and {path})."
                        )
                    self.where[key] = path
            with contextlib.suppress(ValueError, TypeError):
                index.update(json.loads(meta.get(INDEX_KEY, "{}")))
            mine = meta.get(METADATA_KEY)
            if mine is None:
                without.append(path)
            elif text is None:
                text, first = mine, path
            elif mine != text:
                raise StorageError(
                    f"{Path(path).name}: its hybrid_sparse metadata differs from {Path(first).name}'s"
                    f"{_first_difference(text, mine)}; every shard carries the same document, so one of them was "
                    "edited. Save the model again."
                )
        if text is None:
            if self.where:
                raise StorageError(
                    "the checkpoint holds hybrid-sparse masks but its shards have no 'hybrid_sparse' metadata (edited headers?)."
                )
            return
        if without:
            raise StorageError(
                f"{Path(without[0]).name} has no hybrid_sparse metadata while {Path(first).name} has: shards from "
                "different saves are mixed in this folder."
            )
        self.doc = parse_metadata(text)
        named: dict[str, str] = {}
        for key, entry in self.doc["modules"].items():
            if entry["mask"] in named:
                raise StorageError(
                    f"{key} and {named[entry['mask']]} name the same mask tensor {entry['mask']!r}."
                )
            named[entry["mask"]] = key
            if entry["mask"] not in self.where:
                raise StorageError(
                    f"{key}: its mask tensor {entry['mask']!r} is missing from the checkpoint."
                )
        orphans = sorted(set(self.where) - set(named))
        if orphans:
            owners = [index.get(o, o) for o in orphans]
            raise StorageError(
                f"{', '.join(owners[:3])}: the checkpoint holds the mask but the metadata has no entry for it (the "
                "entry was removed); the sparsity state is incomplete. Save the model again."
            )
        if not self.doc["digest_ok"]:
            raise StorageError(
                "the hybrid_sparse metadata does not match its digest: its recipe or list of modules was edited "
                "after saving. Save the model again."
            )

    def tensor(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` (a mask) from the file that holds it."""
        path = self.where[name]
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="pt"))
        return self._handles[path].get_tensor(name)

    def mask(self, key: str) -> torch.Tensor:
        """The full keep-mask of module entry ``key`` (either mask layout), in the parameter's shape."""
        return self.mask_and_bits(key)[0]

    def mask_and_bits(self, key: str) -> tuple[torch.Tensor, np.ndarray | None]:
        """The keep-mask of ``key`` and, for the full layout, its packed bytes (the checks count bits in them)."""
        entry = self.doc["modules"][key]
        return decode_mask(key, entry, self.tensor(entry["mask"]))


def decode_mask(key: str, entry: dict, packed: torch.Tensor) -> tuple[torch.Tensor, np.ndarray | None]:
    """The keep-mask of module entry ``key`` from its stored ``packed`` bytes, and for the full layout the
    bytes themselves as NumPy (thread-safe: it touches no file)."""
    if entry.get("mask_scope", "all") != "nondense":
        return _unpack(key, packed, entry["shape"]), packed.numpy()
    informative = non_dense(entry["tier_map"], entry["block_size"], entry["transposed"], entry["shape"])
    return scatter(_unpack(key, packed, (count_true(informative),)), informative, fill=True), None


def _first_difference(a: str, b: str) -> str:
    """`` in <module>`` for the first module entry where two header documents differ (best effort)."""
    try:
        ma, mb = json.loads(a).get("modules", {}), json.loads(b).get("modules", {})
    except (ValueError, AttributeError):
        return ""
    for key in sorted(set(ma) | set(mb)):
        if ma.get(key) != mb.get(key):
            return f" in {key}"
    return ""


def read_metadata(files: list[str]) -> dict | None:
    """The parsed (and cross-checked) header document of ``files`` (``None`` when none has one)."""
    with Checkpoint(files) as ckpt:
        return ckpt.doc


def _resolve(model: torch.nn.Module, key: str) -> tuple[torch.nn.Module, str, torch.Tensor]:
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
    return module, pname, param


def byte_rules(entry: dict) -> bool:
    """Whether the tier rules of ``entry`` are counted on the packed bytes (2-D, 16x16 blocks, 2:4)."""
    return (
        entry["tier_map"] is not None
        and len(entry["shape"]) == 2
        and not entry["transposed"]
        and entry["block_size"] == 16
        and entry["nm"] == "2:4"
    )


def verified_state(
    key: str,
    entry: dict,
    mask: torch.Tensor | None,
    weight: torch.Tensor | None,
    bits: np.ndarray | None = None,
) -> ParamSparsity:
    """The :class:`ParamSparsity` of a header ``entry`` after every check against its ``mask`` and ``weight``.

    ``weight`` is the loaded parameter (``None`` or on ``meta`` when offloaded: its zeros are not checked).
    ``bits`` (the packed mask bytes, row-major, LSB first) lets the counts run on bytes: 8x less data.
    With ``mask=None`` (``bits`` given) the mask is unpacked only if a check needs it; otherwise the state
    keeps it packed until first read (:meth:`ParamSparsity.from_bits`). The counts come from the
    extension's one-pass check where it is built (:func:`native_counts`), else from NumPy.
    """
    if bits is None:
        bits = pack_bits(mask).numpy()
    by_bytes = byte_rules(entry)
    if weight is not None and weight.device.type == "meta":
        weight = None  # offloaded: its zeros cannot be checked here
    faults = native_counts(entry, weight, bits, by_bytes)
    if faults is not None:
        kept, revived, *tier_faults = faults
    else:
        # the tier rules count kept weights per block anyway: their sum is the kept count
        counted = _segment_counts(bits, entry) if by_bytes else None
        kept = int((counted[1] if counted else popcount(bits)).sum(dtype=np.int64))
        revived = 0 if weight is None else int(popcount(nonzero_bits(weight) & ~bits).sum(dtype=np.int64))
        tier_faults = _tier_faults_bytes(bits, entry, counted) if by_bytes else None
    if kept != entry["kept"]:
        raise StorageError(f"{key}: the mask keeps {kept} weights, the metadata says {entry['kept']}.")
    if revived:
        raise StorageError(
            f"{key}: {revived} weights that the mask prunes are not zero; the weights "
            "and the mask disagree (edited or mixed-up checkpoint)."
        )
    needs_mask = entry["tier_map"] is not None or entry["pattern"] not in ("unstructured", "zeros")
    if mask is None and needs_mask and not by_bytes:
        mask = _unpack(key, torch.from_numpy(bits), entry["shape"])  # the rules below read the mask
    if by_bytes:
        _raise_tier_faults(key, entry, *tier_faults)
    elif entry["tier_map"] is not None:
        _check_tiers(key, mask, entry["tier_map"], entry)
    else:
        _check_pattern(key, mask, entry)
    device = weight.device if weight is not None else torch.device("cpu")
    recipe = dict(
        tier_map=entry["tier_map"],
        pattern=entry["pattern"],
        method=entry["method"],
        block_size=entry["block_size"],
        nm=entry["nm"],
        topk_per_block=entry["topk_per_block"],
        transposed=entry["transposed"],
    )
    if mask is None:
        return ParamSparsity.from_bits(bits, entry["shape"], device, **recipe)
    return ParamSparsity(mask=mask.to(device), **recipe)


def restore_state(
    model: torch.nn.Module,
    files: list[str],
    skip: set[str] | None = None,
    ckpt: Checkpoint | None = None,
) -> None:
    """Read masks and tier maps from safetensors ``files``, verify them, attach them to ``model``.

    Entries in ``skip`` (layers already restored another way, e.g. packed on load) are left out. ``ckpt``
    reuses an already parsed :class:`Checkpoint` of the same files. The checks of different layers run in
    parallel (NumPy, torch and the extension release the GIL).
    """
    own = ckpt is None
    ckpt = Checkpoint(files) if own else ckpt
    try:
        if ckpt.doc is None:
            raise StorageError(
                f"The checkpoint declares quant_method='{QUANT_METHOD}' but its safetensors headers hold no "
                f"'{METADATA_KEY}' metadata; the files were not written by hf-hybrid-sparse or were edited."
            )
        jobs = []
        for key, entry in ckpt.doc["modules"].items():
            if skip and key in skip:
                continue
            module, pname, param = _resolve(model, key)
            compressed = entry["values"] is not None
            if not compressed and tuple(param.shape) != entry["shape"]:
                raise StorageError(
                    f"{key}: the saved mask has shape {list(entry['shape'])} but the parameter has {list(param.shape)}."
                )
            # file reads stay on this thread; decoding goes to the pool, except where the fill needs the mask
            packed, decoded = ckpt.tensor(entry["mask"]), None
            if compressed:
                decoded = decode_mask(key, entry, packed)
                param = _fill_from_values(key, module, pname, param, decoded[0], entry)
            jobs.append((key, entry, packed, decoded, param, module, pname))

        def check(job) -> ParamSparsity:
            key, entry, packed, decoded, param = job[:5]
            if decoded is None and entry.get("mask_scope", "all") == "all":
                # the full layout's bits are all the checks need: the bool mask is made when first read
                try:
                    check_packed(packed, entry["shape"])
                except ValueError as exc:
                    raise StorageError(f"{key}: {exc}") from None
                # a copy: the state may hold these bytes, and the file's mapping must not outlive a rewrite
                return verified_state(key, entry, None, param, packed.numpy().copy())
            mask, bits = decoded or decode_mask(key, entry, packed)
            return verified_state(key, entry, mask, param, bits)

        workers = max(1, min(torch.get_num_threads(), len(jobs)))
        with ThreadPoolExecutor(workers) as pool:
            states = list(pool.map(check, jobs))
        for job, state in zip(jobs, states):
            set_param_state(job[5], job[6], state)
    finally:
        if own:
            ckpt.__exit__(None, None, None)


def _fill_from_values(key, module, pname, param, mask, entry) -> torch.nn.Parameter:
    """Rebuild a compressed parameter (loaded as its 1-D kept values) as the dense weight."""
    if param.device.type == "meta":
        raise StorageError(
            f"{key}: compressed checkpoints cannot be loaded into offloaded (meta) parameters."
        )
    new = torch.nn.Parameter(
        expand_values(key, param.detach(), mask, entry), requires_grad=param.requires_grad
    )
    setattr(module, pname, new)
    return new


def expand_values(key: str, values: torch.Tensor, mask: torch.Tensor, entry: dict) -> torch.Tensor:
    """The dense weight of a compressed entry from its stored kept values (1-D, row-major) and its mask."""
    if values.dim() != 1 or values.numel() != entry["kept"]:
        raise StorageError(f"{key}: {values.numel()} stored values for {entry['kept']} kept weights.")
    try:
        return scatter(values, mask)
    except ValueError as exc:  # the mask keeps another count than the header says
        raise StorageError(f"{key}: {exc}") from None


def _check_pattern(key: str, mask: torch.Tensor, entry: dict) -> None:
    """An N:M entry's mask keeps at most N of every M consecutive inputs of each row."""
    if entry["pattern"] in ("unstructured", "zeros"):
        return
    try:
        n, m = parse_nm(entry["pattern"])
    except ConfigError:
        raise StorageError(f"{key}: pattern {entry['pattern']!r} is not valid.") from None
    logical = mask.transpose(-1, -2) if entry["transposed"] else mask
    if logical.shape[-1] % m:
        raise StorageError(f"{key}: {logical.shape[-1]} inputs do not divide into groups of {m}.")
    if (logical.reshape(*logical.shape[:-1], -1, m).sum(-1) > n).any():
        raise StorageError(
            f"{key}: the mask keeps more than {n} of {m} weights in a group (pattern {entry['pattern']})."
        )


def _over_2_of_4(segments: np.ndarray) -> np.ndarray:
    """Per uint16 (16 mask bits, four 2:4 groups of 4): nonzero where some group keeps more than 2.

    Bit-parallel: each 4-bit group's count (0..4) lands in its own nibble; a count of 3 or 4 is exactly
    the one whose nibble reaches bit 2 after adding 1. Byte order does not matter: a group never straddles
    a byte.
    """
    x = segments - ((segments >> 1) & 0x5555)
    x = (x & 0x3333) + ((x >> 2) & 0x3333)
    return (x + 0x1111) & 0x4444


def _segment_counts(bits: np.ndarray, entry: dict) -> tuple[np.ndarray, np.ndarray]:
    """The mask's 16-bit row segments ``[block row, row in block, block column]`` of a 2-D 16x16 entry,
    and the kept weights per block ``[block rows, block columns]``."""
    out_f, in_f = entry["shape"]
    segments = bits.view(np.uint16).reshape(out_f // 16, 16, in_f // 16)
    return segments, popcount(segments).sum(axis=1, dtype=np.uint16)


def _tier_faults_bytes(
    bits: np.ndarray, entry: dict, counted: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[int, int, int]:
    """:func:`check_hybrid` for a 2-D 16x16 2:4 entry, counted on the packed bytes (two per block row):
    the DENSE blocks missing weights, the TOPK blocks over top-K, the NM block-row groups of 4 over 2.

    ``counted`` is :func:`_segment_counts` of ``bits`` when the caller has it already.
    """
    tiers = entry["tier_map"].numpy()
    segments, counts = counted if counted is not None else _segment_counts(bits, entry)
    return (
        int(np.count_nonzero(counts[tiers == DENSE] != 256)),
        int(np.count_nonzero(counts[tiers == TOPK] > entry["topk_per_block"])),
        int(np.count_nonzero(_over_2_of_4(segments).astype(bool) & (tiers == NM)[:, None, :])),
    )


def _raise_tier_faults(key: str, entry: dict, dense_bad: int, topk_bad: int, nm_bad: int) -> None:
    if dense_bad:
        raise StorageError(f"{key}: the mask does not obey its tier map (a DENSE block has pruned weights).")
    if topk_bad:
        raise StorageError(
            f"{key}: the mask does not obey its tier map (a TOPK block keeps more than {entry['topk_per_block']} weights)."
        )
    if nm_bad:
        raise StorageError(
            f"{key}: the mask does not obey its tier map (an NM block has more than 2 of 4 kept)."
        )


def native_counts(
    entry: dict, weight: torch.Tensor | None, bits: np.ndarray, byte_rules: bool
) -> list[int] | None:
    """``[kept, revived, DENSE faults, TOPK faults, NM faults]`` from the extension's one-pass check
    (``csrc/mask_checks.cpp``; the tier faults are 0 unless ``byte_rules``), or ``None`` where it does not
    apply: not built, a weight off the CPU, not contiguous or of another dtype (the NumPy path then)."""
    if weight is not None and (
        weight.device.type != "cpu" or weight.dtype not in NATIVE_DTYPES or not weight.is_contiguous()
    ):
        return None
    if not native.ready():
        return None
    counts = torch.ops.hf_hybrid_sparse.check_mask(
        None if weight is None else weight.detach(),
        torch.from_numpy(bits),
        list(entry["shape"]),
        entry["tier_map"] if byte_rules else None,
        int(entry["topk_per_block"] or 0),
    )
    return list(counts)


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
        "compressed": any(e["values"] is not None for e in doc["modules"].values()),
        "tier_maps": {name: e["tier_map"] for name, e in doc["modules"].items() if e["tier_map"] is not None},
    }
