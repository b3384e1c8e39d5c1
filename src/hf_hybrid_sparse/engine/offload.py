"""Reading and writing the weights of blocks that accelerate dispatched or offloaded.

With ``device_map`` offload, a block's parameters sit on the ``meta`` device and an
``AlignDevicesHook`` loads them from its ``weights_map`` for each forward. To prune such a
block we load it, change the weights, and write the new values back into the ``weights_map``
(RAM for CPU offload, a fresh ``.dat`` file in the offload folder for disk offload) so that
every later forward sees the pruned weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _offloading_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    from accelerate.utils import has_offloaded_params

    return [(name, m) for name, m in block.named_modules() if has_offloaded_params(m)]


def is_offloaded(block: nn.Module) -> bool:
    """Whether any parameter of ``block`` is offloaded by an accelerate hook."""
    return bool(_offloading_modules(block))


@contextlib.contextmanager
def onloaded(block: nn.Module) -> Iterator[None]:
    """Materialise the offloaded parameters of ``block`` on their execution device for the context."""
    hooked = _offloading_modules(block)
    for _, module in hooked:
        module._hf_hook.pre_forward(module)
    try:
        yield
    finally:
        for _, module in hooked:
            module._hf_hook.post_forward(module, None)


def write_param(block: nn.Module, module_name: str, param_name: str, value: torch.Tensor) -> None:
    """Set ``block.<module_name>.<param_name>`` to ``value``, persisting it in any offload store."""
    module = block.get_submodule(module_name) if module_name else block
    param = getattr(module, param_name)
    if param.device.type != "meta":
        with torch.no_grad():
            param.copy_(value.to(device=param.device, dtype=param.dtype))
    full = f"{module_name}.{param_name}" if module_name else param_name
    for hook_name, hooked in _offloading_modules(block):
        prefix = f"{hook_name}." if hook_name else ""
        if not full.startswith(prefix):
            continue
        _store(hooked._hf_hook.weights_map, full[len(prefix) :], value.to(dtype=param.dtype))
        return


def _store(weights_map, key: str, value: torch.Tensor) -> None:
    from accelerate.utils import OffloadedWeightsLoader, offload_weight

    prefix = ""
    dataset = weights_map
    while hasattr(dataset, "prefix") and hasattr(dataset, "dataset"):  # accelerate's PrefixedDataset
        prefix += dataset.prefix
        dataset = dataset.dataset
    full_key = prefix + key
    value = value.detach().to("cpu")
    if isinstance(dataset, OffloadedWeightsLoader):
        if full_key in dataset.state_dict:
            dataset.state_dict[full_key].copy_(value)
        elif dataset.save_folder is not None:
            # a new memmap in the offload folder; the index entry stops pointing at the checkpoint
            offload_weight(value, full_key, dataset.save_folder, index=dataset.index)
        else:
            dataset.state_dict[full_key] = value
            if full_key not in dataset.all_keys:
                dataset.all_keys.append(full_key)
    elif isinstance(dataset, dict):
        if full_key in dataset and dataset[full_key].shape == value.shape:
            dataset[full_key].copy_(value)
        else:
            dataset[full_key] = value
    else:
        raise TypeError(
            f"Cannot write the offloaded weight {full_key!r} back into a {type(dataset).__name__}."
        )
