"""Loading straight into packed layers: ``from_pretrained(..., quantization_config=HybridSparseConfig(use_kernels=True))``.

Before the weights load, every hybrid-pruned linear layer of the (meta) model is replaced by a
:class:`PackOnLoad` stand-in. When transformers assigns the layer's weight, the stand-in reads the layer's
mask from the checkpoint, makes every check a normal load makes, packs the weight and lets the dense
tensor go; after loading, the stand-ins are swapped for their :class:`HybridSparseLinear`. The dense model
is never whole in memory: the peak is the packed model plus one dense layer.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

import torch
from torch import nn

from .. import system
from ..errors import StorageError
from ..kernels.linear import HybridSparseLinear
from .reader import Checkpoint, expand_values, verified_state

_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim the pages; their content is kept (re-read from the file on use)


def _release_pages(weight: torch.Tensor) -> None:
    """Ask the kernel to reclaim the pages of a dense CPU weight that was just packed.

    safetensors maps each file once and keeps the mapping while any of its tensors lives (the embeddings,
    the norms), so the pages read to pack a layer would stay resident beside the packed copy. PAGEOUT never
    changes content (a page still in use is simply read back), so it is safe whoever else holds the
    tensor; only the pages entirely inside the weight are touched. Best effort: elsewhere a no-op.
    """
    libc = system.libc()
    if libc is None or weight.device.type != "cpu":
        return
    page = os.sysconf("SC_PAGE_SIZE")
    start = weight.data_ptr()
    lo = -(-start // page) * page
    hi = (start + weight.numel() * weight.element_size()) // page * page
    if hi > lo:
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(_MADV_PAGEOUT))


def _trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc): packing frees one dense temporary per
    layer, which glibc would otherwise keep as resident memory of the process. Best effort."""
    libc = system.libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):  # not glibc
            libc.malloc_trim(0)


class PackOnLoad(nn.Module):
    """Stands in for one hybrid-pruned linear layer while ``from_pretrained`` loads (see module docstring)."""

    def __init__(self, layer: nn.Module, key: str, entry: dict, ckpt: Checkpoint, path: str) -> None:
        super().__init__()
        object.__setattr__(self, "_spec", (key, entry, ckpt, type(layer), path))
        object.__setattr__(self, "built", None)
        self.weight = nn.Parameter(torch.empty(layer.weight.shape, dtype=layer.weight.dtype, device="meta"))
        self.bias = getattr(layer, "bias", None)

    def __setattr__(self, name: str, value) -> None:
        spec = self.__dict__.get("_spec")
        if (
            name == "weight"
            and spec is not None
            and isinstance(value, torch.Tensor)
            and value.device.type != "meta"
        ):
            self._pack(value)
            return
        super().__setattr__(name, value)

    def _pack(self, weight: torch.Tensor) -> None:
        key, entry, ckpt, origin, path = self._spec
        mask, bits = ckpt.mask_and_bits(key)
        source = weight  # the tensor transformers read from the file (kept values or the dense weight)
        if weight.dim() == 1:  # compressed layout: the kept values
            weight = expand_values(key, weight.detach(), mask, entry)
        elif tuple(weight.shape) != entry["shape"]:
            raise StorageError(
                f"{key}: the saved mask has shape {list(entry['shape'])} but the weight has {list(weight.shape)}."
            )
        state = verified_state(key, entry, mask, weight, bits)
        object.__setattr__(
            self, "built", HybridSparseLinear.from_weight(weight, state, None, origin, path=path)
        )
        _release_pages(source)

    def finish(self) -> HybridSparseLinear:
        """The packed layer, with its bias."""
        key = self._spec[0]
        if self.built is None:
            raise StorageError(f"{key}: its weight was not in the checkpoint, so it could not be packed.")
        if self.bias is not None:
            if self.bias.device.type == "meta":
                raise StorageError(f"{key}: its bias was not in the checkpoint.")
            self.built.bias = nn.Parameter(self.bias.detach().clone())
        return self.built


def install(model: nn.Module, ckpt: Checkpoint, path: str = "auto") -> set[str]:
    """Replace the layers ``ckpt`` describes as hybrid 16x16 2:4 by stand-ins; returns their entry names."""
    keys = set()
    for key, entry in ckpt.doc["modules"].items():
        module_name, _, pname = key.rpartition(".")
        if pname != "weight" or entry["tier_map"] is None or len(entry["shape"]) != 2:
            continue
        if entry["block_size"] != 16 or entry["nm"] != "2:4":
            continue  # the packed format has 16x16 blocks with 2:4 NM tiers; others load as plain layers
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        setattr(parent, child, PackOnLoad(layer, key, entry, ckpt, path))
        keys.add(key)
    return keys


def finish(model: nn.Module) -> None:
    """Swap every stand-in for its packed layer."""
    swapped = False
    for name, module in list(model.named_modules()):
        if isinstance(module, PackOnLoad):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.finish())
            swapped = True
    if swapped:  # only packing frees dense temporaries; a trim costs ~10 ms even with nothing to give back
        _trim_heap()
