"""Errors raised by hf-hybrid-sparse; all derive from :class:`HybridSparseError` (a ``ValueError``)."""


class HybridSparseError(ValueError):
    """Base class: bad input or a state the package cannot work with."""


class ConfigError(HybridSparseError):
    """An inconsistent :class:`~hf_hybrid_sparse.HybridSparseConfig`."""


class ModelStructureError(HybridSparseError):
    """The model cannot be pruned as asked (not causal, no blocks, shapes that do not tile)."""


class CalibrationError(HybridSparseError):
    """Calibration data that is missing, empty or too short."""


class TierMapError(HybridSparseError):
    """A previous tier map of the wrong shape, or one that would move a block to a denser tier."""


class PruningError(HybridSparseError):
    """A failure while pruning one block; the message names the block and the module."""


class StorageError(HybridSparseError):
    """A saved sparsity state that is missing, corrupted, or does not match the model."""


class SparsityError(HybridSparseError):
    """Masks that cannot be applied (no sparsity, wrong shapes, or a checkpoint that disagrees)."""


class PackingError(HybridSparseError):
    """A weight, mask or tier map that the packed kernel format cannot hold."""


class ScheduleError(HybridSparseError):
    """A progressive schedule that cannot be read or that would move blocks to a denser tier."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty): for one-line errors that
    wrap a library's multi-line ones (network, datasets)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
