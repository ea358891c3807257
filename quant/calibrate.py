"""Calibration: stream images through the float model, observing every activation.

All activation slots are observed at once, whatever config comes later: the
statistics are observer-agnostic histograms, so one calibration serves every
preset, the analyzers and the planner.
"""

from __future__ import annotations

from typing import Iterable

import torch
from tqdm import tqdm

from .model import QuantModel
from .modes import FLOAT, OBSERVE


def calibrate(qmodel: QuantModel, batches: Iterable[torch.Tensor], total: int | None = None,
              progress: bool = True) -> int:
    """Observe all activations on ``batches`` of pixel values; returns images seen."""
    seen = 0
    qmodel.reset_calibration()  # a second calibration replaces the first, never merges
    qmodel.set_mode(OBSERVE)
    try:
        for pixels in tqdm(batches, total=total, desc="calibrate", unit="batch", disable=not progress):
            qmodel(pixels)
            seen += len(pixels)
    finally:
        qmodel.set_mode(FLOAT)
    if seen == 0:
        raise ValueError("calibration saw no images")
    return seen
