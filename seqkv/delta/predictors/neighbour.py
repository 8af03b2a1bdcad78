"""The previous position as the prediction (DPCM along time): no compute, no side information."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Layout, Predictor


@dataclass
class Neighbour(Predictor):
    """Each position predicted by the previous position of the same channel (DPCM along
    time): no compute, no side information. Exact mode only."""

    name = "neighbour"
    along_positions = True

    def predict(self, lm, ids, side: bytes, layout: Layout) -> None:
        return None  # the residuals are taken between positions, not from a prediction
