"""The one small interface every predictor of the delta tier implements.

A predictor says what the restoring side can compute (or cheaply be told) about a KV cache.
``side_info(kv, lm)`` is what it needs stored (charged to the residual part);
``predict(lm, ids, side, layout)`` is the prediction in the stored dtypes and shapes, or
None: code the bit patterns themselves. A predictor with ``along_positions`` predicts each
position from the one before it (the residual is the difference of consecutive bit
patterns, undone by a running sum). ``describe`` states the compute it costs as a fraction
of one prefill of the model (forward multiply-adds without the LM head). Its dataclass
fields are its parameters, recorded in the blob's header and given back to it on restore.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import ClassVar

import torch

from ...core.cache import KVCache
from ...core.errors import ModelMismatchError
from ...core.models import LoadedModel

Layout = list[tuple[tuple[int, ...], torch.dtype]]


class Predictor:
    """Defaults for a predictor that needs no model and computes the same on every machine."""

    name: ClassVar[str]
    needs_model: ClassVar[bool] = False  # the restore needs the model
    along_positions: ClassVar[bool] = False  # residuals between neighbouring positions
    repeat_check: ClassVar[bool] = False  # compute twice at compress: kernels may not repeat
    restore_attempts: ClassVar[int] = 1  # tries at restore before the prediction is refused

    def describe(self, config=None) -> dict:
        return {"name": self.name, "compute": 0.0}

    def params(self) -> dict:
        """The parameters recorded in a blob's header (its dataclass fields)."""
        return asdict(self)

    def side_info(self, kv: KVCache, lm: LoadedModel | None) -> bytes:
        return b""

    def predict(self, lm: LoadedModel | None, ids: list[int], side: bytes,
                layout: Layout) -> list[torch.Tensor] | None:
        raise NotImplementedError

    def next_candidate(self, lm: LoadedModel) -> bool:
        """After a prediction that did not repeat: switch to the next best numerics, if any."""
        return False


def check_layout(pred: list[torch.Tensor], layout: Layout, what: str) -> list[torch.Tensor]:
    """A prediction on the CPU in the stored dtypes, refused if its shapes are not the cache's."""
    if len(pred) != len(layout):
        raise ModelMismatchError(
            f"the {what} predictor gives {len(pred) // 2} layers, the cache has "
            f"{len(layout) // 2}: a different model?"
        )
    out = []
    for i, (p, (shape, dtype)) in enumerate(zip(pred, layout, strict=True)):
        if tuple(p.shape) != tuple(shape):
            raise ModelMismatchError(
                f"the {what} predictor's layer {i // 2} {'kv'[i % 2]} has shape "
                f"{tuple(p.shape)}, the cache {tuple(shape)}: a different model?"
            )
        out.append(p.detach().to("cpu", dtype).contiguous())
    return out
