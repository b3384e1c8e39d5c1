"""`HybridSparseLinear`: a drop-in ``nn.Linear`` holding the packed hybrid weight; model conversion.

Forward paths:

* ``reference`` -- pure PyTorch, any device: unpack to the dense masked weight, ``F.linear``.
  Exact against the dense masked product (it is the same product).
* ``triton`` -- on CUDA for 1-16 tokens: the decode kernel of :mod:`.triton_decode` reads
  the packed bytes directly. More tokens (prefill) use the dense GEMM on the unpacked weight
  (cached when ``cache_dense=True``, otherwise unpacked per call).

``path="auto"`` picks ``triton`` on CUDA for fp16/bf16/fp32 when Triton is installed, else
``reference`` (with a one-time warning when CUDA was available but the kernel could not be used).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from ..config import parse_nm
from ..errors import HybridSparseError, PackingError
from ..state import ParamSparsity, get_state, set_param_state
from .packing import FIELDS, PACK_FORMAT_VERSION, PackedHybrid, pack, unpack
from .triton_decode import decode, triton_available

logger = hf_logging.get_logger(__name__)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class HybridSparseLinear(nn.Module):
    """Linear layer whose weight is stored in the packed hybrid format (buffers, saved in ``state_dict``)."""

    def __init__(
        self,
        packed: PackedHybrid,
        bias: torch.Tensor | None = None,
        path: str = "auto",
        cache_dense: bool = False,
    ) -> None:
        super().__init__()
        if path not in ("auto", "reference", "triton"):
            raise HybridSparseError(f"path={path!r}; choose auto, reference or triton.")
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.topk = packed.topk
        self.path = path
        self.cache_dense = cache_dense
        self._dense: torch.Tensor | None = None
        self._warned = False
        for name in FIELDS:
            self.register_buffer(name, packed.tensors[name])
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
        if state.block_size != 16:
            raise PackingError(
                f"the packed kernels use 16x16 blocks, this layer was pruned with {state.block_size}."
            )
        weight = linear.weight.detach()
        logical = weight.t() if state.transposed else weight
        packed = pack(
            logical,
            state.logical_mask().to(weight.device),
            state.tier_map,
            state.topk_per_block,
            parse_nm(state.nm),
        )
        module = cls(packed, getattr(linear, "bias", None), **kwargs)
        module._origin = (type(linear), state)  # to convert back
        return module.to(weight.device)

    @property
    def packed(self) -> PackedHybrid:
        return PackedHybrid(
            self.out_features, self.in_features, self.topk, {n: getattr(self, n) for n in FIELDS}
        )

    def dense_weight(self) -> torch.Tensor:
        """The dense logical weight ``[out, in]`` (cached when ``cache_dense``)."""
        if self._dense is not None:
            return self._dense
        w = unpack(self.packed)
        if self.cache_dense:
            self._dense = w
        return w

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, topk={self.topk}, path={self.path}"

    # -- forward --------------------------------------------------------------------------------
    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.path == "reference":
            return False
        ok = x.is_cuda and x.dtype in KERNEL_DTYPES and triton_available()
        if not ok and self.path == "triton":
            raise HybridSparseError(
                f"the Triton path needs CUDA, Triton and a dtype in {KERNEL_DTYPES} (got device {x.device}, "
                f"dtype {x.dtype}); use path='reference'."
            )
        if not ok and x.is_cuda and not self._warned:
            logger.warning(f"HybridSparseLinear: dtype {x.dtype} has no kernel; using the reference path.")
            self._warned = True
        return ok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        if self._use_triton(x) and flat.shape[0] <= 16:
            y = decode(flat, self.packed, self.bias)
            return y.reshape(*lead, self.out_features)
        w = self.dense_weight().to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "pack_format_version"
        if key in state_dict and int(state_dict[key]) != PACK_FORMAT_VERSION:
            raise PackingError(
                f"{prefix[:-1] or 'module'}: packed state dict has format version {int(state_dict[key])}, "
                f"this version reads {PACK_FORMAT_VERSION}; re-pack from the dense checkpoint."
            )
        for name in FIELDS:  # packed sizes depend on the tier counts: adopt the incoming shapes
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        self._dense = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def convert_to_hybrid_kernels(model: nn.Module, path: str = "auto", cache_dense: bool = True) -> list[str]:
    """Replace every hybrid-pruned linear layer of ``model`` by a :class:`HybridSparseLinear`.

    Layers pruned with other patterns, and fused MoE experts, stay as they are. With ``cache_dense``
    (default) the prefill path keeps an unpacked copy of each weight after its first use -- dense speed,
    but dense memory on top of the packed bytes; ``cache_dense=False`` unpacks on every prefill call.
    Returns the names of the converted layers.
    """
    converted = []
    for name, module in list(model.named_modules()):
        state = get_state(module).get("weight")
        if state is None or state.tier_map is None or getattr(module, "weight", None) is None:
            continue
        if module.weight.dim() != 2:
            continue
        _replace(
            model, name, HybridSparseLinear.from_linear(module, state, path=path, cache_dense=cache_dense)
        )
        converted.append(name)
    return converted


def convert_to_dense(model: nn.Module) -> list[str]:
    """Inverse of :func:`convert_to_hybrid_kernels`: original layer types with weights and sparsity state."""
    restored = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, HybridSparseLinear):
            continue
        cls, state = getattr(module, "_origin", (nn.Linear, None))
        weight = module.dense_weight()
        if state is not None and state.transposed:
            new = cls(module.out_features, module.in_features)  # Conv1D(nf=out, nx=in)
            new.weight.data = weight.t().contiguous()
        else:
            new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            new.weight.data = weight.contiguous()
        if module.bias is not None:
            new.bias.data = module.bias.detach().clone()
        else:
            new.bias = None
        new = new.to(weight.device)
        if state is not None:
            set_param_state(new, "weight", state)
        _replace(model, name, new)
        restored.append(name)
    return restored
