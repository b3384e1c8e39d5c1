"""`HybridSparseLinear`: a drop-in ``nn.Linear`` holding only the packed hybrid weight; model conversion.

The module keeps the packed tensors of :mod:`.packing` as buffers and nothing else: no dense copy, no
mask (both are derived when asked: :meth:`HybridSparseLinear.dense_weight`, :meth:`~HybridSparseLinear.mask`,
:meth:`~HybridSparseLinear.tier_map`). Forward paths:

* ``cpu`` -- the C++ kernel of :mod:`.cpu` (built on first use): 1-16 tokens read each packed byte once,
  more tokens (prefill) feed unpacked panels (a reused buffer) to the BLAS. fp32, bf16 and fp16.
* ``triton`` -- on CUDA, 1-16 tokens: the decode kernel of :mod:`.triton_decode`; more tokens unpack the
  weight for the call and run the dense GEMM.
* ``reference`` -- pure PyTorch, any device: unpack to the dense masked weight, ``F.linear``. Exact against
  the dense masked product (it is the same product); also the path whenever gradients are needed.

``path="auto"`` picks ``cpu`` on CPU and ``triton`` on CUDA when they can run (else ``reference``, with one
warning). The environment variable ``HF_HYBRID_SPARSE_KERNEL=reference`` (or ``cpu``) overrides ``auto``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..config import parse_nm
from ..errors import HybridSparseError, PackingError
from ..logs import get_logger
from ..pruning.patterns import DENSE, NM, TOPK
from ..state import ParamSparsity, clear_state, get_state, set_param_state
from . import cpu
from .packing import BLOCK, FIELDS, PACK_FORMAT_VERSION, PackedHybrid, canonical_nm, pack, unpack
from .triton_decode import MAX_DECODE_TOKENS, decode, triton_available

logger = get_logger(__name__)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PATHS = ("auto", "reference", "cpu", "triton")


def _padding_slots(keep: torch.Tensor) -> torch.Tensor:
    """Flat indices of the value slots that hold padding (a position the mask prunes), as int64."""
    return (~keep).reshape(-1).nonzero().reshape(-1)


class HybridSparseLinear(nn.Module):
    """Linear layer stored in the packed hybrid format (buffers, saved in ``state_dict``); inference only.

    ``nm_pad`` / ``topk_pad`` list the value slots that are padding (groups or blocks with fewer kept
    weights than N or K, after re-pruning): with them the exact keep-mask can be derived.
    """

    def __init__(
        self,
        packed: PackedHybrid,
        bias: torch.Tensor | None = None,
        path: str = "auto",
        nm_pad: torch.Tensor | None = None,
        topk_pad: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if path not in PATHS:
            raise HybridSparseError(f"path={path!r}; choose one of {', '.join(PATHS)}.")
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.topk = packed.topk
        self.path = path
        self._warned = False
        self._origin: tuple[type, dict] = (nn.Linear, {})  # layer class and recipe bits, to convert back
        for name, t in canonical_nm(packed.tensors).items():
            self.register_buffer(name, t)
        self.register_buffer("nm_pad", torch.zeros(0, dtype=torch.long) if nm_pad is None else nm_pad)
        self.register_buffer("topk_pad", torch.zeros(0, dtype=torch.long) if topk_pad is None else topk_pad)
        self.register_buffer("pack_format_version", torch.tensor(PACK_FORMAT_VERSION, dtype=torch.int32))
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls, linear: nn.Module, state: ParamSparsity | None = None, **kwargs
    ) -> HybridSparseLinear:
        """Pack a pruned ``nn.Linear`` (or GPT-2 ``Conv1D``) using its tier map."""
        state = state or get_state(linear).get("weight")
        if state is None or state.tier_map is None:
            raise HybridSparseError(
                f"{type(linear).__name__} has no hybrid tier map: prune it with pattern='hybrid' before converting."
            )
        if state.block_size != BLOCK:
            raise PackingError(
                f"the packed kernels use 16x16 blocks, this layer was pruned with {state.block_size}."
            )
        return cls.from_weight(linear.weight, state, getattr(linear, "bias", None), type(linear), **kwargs)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        state: ParamSparsity,
        bias: torch.Tensor | None = None,
        origin: type = nn.Linear,
        **kwargs,
    ) -> HybridSparseLinear:
        """Pack ``weight`` (in the layout of an ``origin`` layer) with its hybrid ``state``."""
        weight = weight.detach()
        logical = weight.t() if state.transposed else weight
        mask = state.logical_mask().to(weight.device)
        packed = pack(logical, mask, state.tier_map, state.topk_per_block, parse_nm(state.nm))
        pads = {k: _padding_slots(v) for k, v in packed.kept.items()}
        module = cls(packed, bias, nm_pad=pads["nm_vals"], topk_pad=pads["topk_vals"], **kwargs)
        recipe = {k: getattr(state, k) for k in ("pattern", "method", "nm", "topk_per_block", "transposed")}
        module._origin = (origin, recipe)
        return module.to(weight.device)

    @property
    def packed(self) -> PackedHybrid:
        return PackedHybrid(
            self.out_features, self.in_features, self.topk, {n: getattr(self, n) for n in FIELDS}
        )

    def nbytes(self) -> int:
        """Bytes of every tensor the layer holds (packed weight, padding lists, bias)."""
        return sum(t.numel() * t.element_size() for t in list(self.buffers()) + list(self.parameters()))

    # -- derived views ----------------------------------------------------------------------------
    def dense_weight(self) -> torch.Tensor:
        """The dense logical weight ``[out, in]`` (unpacked for this call; nothing is cached)."""
        tensors = [getattr(self, n) for n in FIELDS]
        if (
            self.dense_vals.device.type == "cpu"
            and self.dense_vals.dtype in KERNEL_DTYPES
            and cpu.available()
        ):
            return cpu.unpack(tensors, self.out_features, self.in_features, self.topk)
        return unpack(self.packed)

    def tier_map(self) -> torch.Tensor:
        """The int8 tier map ``[out/16, in/16]`` the packed tensors encode."""
        rows, cols = self.out_features // BLOCK, self.in_features // BLOCK
        tiers = torch.empty(rows, cols, dtype=torch.int8)
        for code, prefix in ((DENSE, "dense"), (NM, "nm"), (TOPK, "topk")):
            ptr = getattr(self, f"{prefix}_row_ptr").cpu().long()
            r = torch.repeat_interleave(torch.arange(rows), ptr[1:] - ptr[:-1])
            tiers[r, getattr(self, f"{prefix}_cols").cpu().long()] = code
        return tiers

    def mask(self) -> torch.Tensor:
        """The exact logical keep-mask ``[out, in]`` (bool): packed positions minus the padding slots."""
        ones = {
            k: torch.ones_like(getattr(self, k), dtype=self.dense_vals.dtype)
            for k in ("nm_vals", "topk_vals")
        }
        flat = {k: v.reshape(-1) for k, v in ones.items()}
        flat["nm_vals"][self.nm_pad] = 0
        flat["topk_vals"][self.topk_pad] = 0
        marker = {n: getattr(self, n) for n in FIELDS} | ones
        marker["dense_vals"] = torch.ones_like(self.dense_vals)
        return unpack(PackedHybrid(self.out_features, self.in_features, self.topk, marker)) != 0

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, topk={self.topk}, path={self.path}"

    # -- forward --------------------------------------------------------------------------------
    def _choose(self, x: torch.Tensor) -> str:
        """The path that runs this call (see the module docstring)."""
        wants = self.path
        if wants == "auto":
            wants = os.environ.get(cpu.ENV, "auto")
            if wants not in PATHS:
                raise HybridSparseError(f"{cpu.ENV}={wants!r}; choose one of {PATHS}.")
        if wants == "reference" or (torch.is_grad_enabled() and x.requires_grad):
            return "reference"
        dtype_ok = self.dense_vals.dtype in KERNEL_DTYPES
        if x.is_cuda:
            ok = dtype_ok and triton_available() and wants in ("auto", "triton")
            if wants == "triton" and not ok:
                raise HybridSparseError(
                    f"the Triton path needs CUDA, Triton and a dtype in {KERNEL_DTYPES}; use path='reference'."
                )
            if not ok and not self._warned:
                logger.warning(
                    f"HybridSparseLinear: no GPU kernel for {self.dense_vals.dtype}; using the reference path."
                )
                self._warned = True
            return "triton" if ok else "reference"
        if wants == "triton":
            raise HybridSparseError(
                "the Triton path needs CUDA: this input is on the CPU; use path='cpu' or 'reference'."
            )
        ok = dtype_ok and cpu.available()
        if not dtype_ok and not self._warned:
            logger.warning(
                f"HybridSparseLinear: no CPU kernel for {self.dense_vals.dtype}; using the reference path."
            )
            self._warned = True
        if wants == "cpu" and not ok:
            raise HybridSparseError(
                f"the CPU kernel is not available (no compiler, or dtype {self.dense_vals.dtype} not in {KERNEL_DTYPES}); "
                "use path='reference'."
            )
        return "cpu" if ok else "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        path = self._choose(x)
        wdtype = self.dense_vals.dtype
        bias = None if self.bias is None else self.bias.to(wdtype)
        if path == "cpu":
            tensors = [getattr(self, n) for n in FIELDS]
            y = cpu.linear(flat.to(wdtype).contiguous(), tensors, bias, self.out_features, self.topk)
        elif path == "triton" and flat.shape[0] <= MAX_DECODE_TOKENS:
            y = decode(flat.to(wdtype), self.packed, bias)
        else:
            y = nn.functional.linear(flat.to(wdtype), self.dense_weight(), bias)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "pack_format_version"
        if key in state_dict and int(state_dict[key]) != PACK_FORMAT_VERSION:
            raise PackingError(
                f"{prefix[:-1] or 'module'}: packed state dict has format version {int(state_dict[key])}, "
                f"this version reads {PACK_FORMAT_VERSION}; re-pack from the dense checkpoint."
            )
        for name in (*FIELDS, "nm_pad", "topk_pad"):  # packed sizes depend on the tier counts: adopt them
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        canonical = canonical_nm({"nm_vals": self.nm_vals, "nm_idx": self.nm_idx})
        self.nm_vals, self.nm_idx = canonical["nm_vals"], canonical["nm_idx"]

    # -- back to a plain layer --------------------------------------------------------------------
    def param_state(self) -> tuple[torch.Tensor, ParamSparsity]:
        """The weight in the original layer's layout and its :class:`ParamSparsity` (mask and tier map derived)."""
        recipe = self._origin[1]
        transposed = recipe.get("transposed", False)
        weight, mask = self.dense_weight(), self.mask().to(self.dense_vals.device)
        state = ParamSparsity(
            mask=(mask.t() if transposed else mask).contiguous(),
            tier_map=self.tier_map(),
            pattern=recipe.get("pattern", "hybrid"),
            method=recipe.get("method", "unknown"),
            block_size=BLOCK,
            nm=recipe.get("nm", "2:4"),
            topk_per_block=self.topk,
            transposed=transposed,
        )
        return (weight.t() if transposed else weight).contiguous(), state


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@dataclass
class ConversionReport:
    """What :func:`convert_to_hybrid_kernels` did: the converted layers and their bytes before and after."""

    names: list[str]
    bytes_before: int
    bytes_after: int

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def __eq__(self, other) -> bool:
        return (
            list(self.names) == list(other) if isinstance(other, (list, ConversionReport)) else NotImplemented
        )

    def __str__(self) -> str:
        return (
            f"{len(self.names)} layers packed: {self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB "
            f"({self.ratio:.3f}x)"
        )


def convert_to_hybrid_kernels(model: nn.Module, path: str = "auto") -> ConversionReport:
    """Replace every hybrid-pruned linear layer of ``model`` by a :class:`HybridSparseLinear`.

    Layers pruned with other patterns, and fused MoE experts, stay as they are. The dense weight and the
    mask of each converted layer are dropped (the packed tensors are all it keeps). Returns the names and
    the bytes of the converted layers before and after (also logged).
    """
    names, before, after = [], 0, 0
    for name, module in list(model.named_modules()):
        state = get_state(module).get("weight")
        if state is None or state.tier_map is None or getattr(module, "weight", None) is None:
            continue
        if module.weight.dim() != 2:
            continue
        new = HybridSparseLinear.from_linear(module, state, path=path)
        before += sum(t.numel() * t.element_size() for t in module.parameters(recurse=False))
        after += new.nbytes()
        clear_state(module)
        _replace(model, name, new)
        names.append(name)
    report = ConversionReport(names, before, after)
    logger.info(f"convert_to_hybrid_kernels: {report}")
    return report


def convert_to_dense(model: nn.Module) -> list[str]:
    """Inverse of :func:`convert_to_hybrid_kernels`: original layer types with weights and sparsity state."""
    restored = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, HybridSparseLinear):
            continue
        cls = module._origin[0]
        weight, state = module.param_state()
        if state.transposed:
            new = cls(module.out_features, module.in_features)  # Conv1D(nf=out, nx=in)
        else:
            new = cls(module.in_features, module.out_features, bias=module.bias is not None)
        new = new.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(weight)
            if module.bias is not None:
                new.bias.copy_(module.bias)
        if module.bias is None and getattr(new, "bias", None) is not None:
            new.bias = None
        set_param_state(new, "weight", state)
        _replace(model, name, new)
        restored.append(name)
    return restored
