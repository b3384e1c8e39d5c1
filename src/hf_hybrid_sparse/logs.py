"""The package's loggers, placed under the ``transformers`` logger so one verbosity switch governs both.

``transformers.logging.set_verbosity_info()`` (or ``_error()``, or ``TRANSFORMERS_VERBOSITY``) shows or
silences this package's messages too, and they go through transformers' handler. The loggers keep their
own names (``hf_hybrid_sparse.engine.sequential``...), so ``logging.getLogger("hf_hybrid_sparse")``
still tunes the package alone.
"""

from __future__ import annotations

import logging

from transformers.utils import logging as hf_logging

ROOT = "hf_hybrid_sparse"

#: progress bars that obey ``transformers.logging.disable_progress_bar()``
tqdm = hf_logging.tqdm


def get_logger(name: str) -> logging.Logger:
    """The logger ``name`` (a module's ``__name__``), a descendant of the ``transformers`` logger."""
    root = logging.getLogger(ROOT)
    library = hf_logging.get_logger("transformers")  # configures transformers' handler and level
    if root.parent is not library:
        # logging links loggers by dotted name only; the package root is re-parented once, and every
        # `hf_hybrid_sparse.*` logger then inherits transformers' level and reaches its handler
        root.parent = library
    return logging.getLogger(name)


def warn_if_long(
    logger: logging.Logger, what: str, first_seconds: float, units: int, hint: str, threshold: float = 120.0
) -> None:
    """After the first of ``units`` equal steps took ``first_seconds``, warn with ``hint`` if the whole
    run is projected past ``threshold`` seconds (CPU-sized work launched with GPU-sized defaults)."""
    total = first_seconds * units
    if total > threshold:
        logger.warning(f"{what} will take about {total / 60:.0f} min at this pace; {hint}")
