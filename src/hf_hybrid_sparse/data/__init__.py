"""Calibration and evaluation text: named corpora (``datasets``), the offline corpus, local files, token ids."""

from .calibration import DEFAULT_CALIBRATION, CalibrationSet, get_calibration_samples, lm_dataset
from .corpora import NamedSet, named

__all__ = [
    "DEFAULT_CALIBRATION",
    "CalibrationSet",
    "get_calibration_samples",
    "lm_dataset",
    "NamedSet",
    "named",
]
