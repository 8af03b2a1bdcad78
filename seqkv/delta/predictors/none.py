"""No prediction: plain entropy coding of the bit patterns (byte planes), the baseline."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Layout, Predictor


@dataclass
class NoPredictor(Predictor):
    """Plain entropy coding of the bit patterns (byte planes): the baseline."""

    name = "none"

    def predict(self, lm, ids, side: bytes, layout: Layout) -> None:
        return None
