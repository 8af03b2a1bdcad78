"""The model's own prefill of the tokens, on the restoring machine, as the prediction."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...core.cache import DTYPE_ALIASES, KVCache, dtype_alias
from ...core.errors import ModelMismatchError, SeqkvError
from ...core.models import LoadedModel
from ...core.stepper import device_label, use_repeatable_attention
from ..numerics import BUILDS, candidates, dtype_of, prefill_kv, search, variant
from .base import Layout, Predictor, check_layout

ATTENTION = ("eager", "sdpa", "flash_attention_2")


@dataclass
class Recompute(Predictor):
    """The model's own prefill of the tokens on the restoring machine, cast to the stored
    dtype (arXiv 2604.15356 §4, layer two). Cost: one full prefill.

    ``dtype``, ``attn`` and ``build`` pick the numerics (the model in a dtype, an attention
    path, built as ``from_pretrained(dtype=...)`` builds it or by ``.to(dtype)``; see
    seqkv.delta.numerics): run in the serving engine's numerics, the prediction equals the
    cache bit for bit. What is left None is searched at compress: each candidate runs over
    the first layers and the cheapest residual wins; the candidates' costs are recorded
    (``search``). Exact restores need both machines to compute the same prediction: the
    numerics are recorded and a hash of the prediction is checked.
    """

    name = "recompute"
    needs_model = True
    # Kernels may not repeat bit for bit from run to run: on the H200 host's CPU (16 threads)
    # one fp32 restore of four computed another prediction than its compress had (refused by
    # the prediction hash, no wrong data). So compress checks a second run, and restore retries.
    repeat_check = True
    restore_attempts = 3
    dtype: str | None = None  # None: searched (the cache's dtype, the model's)
    attn: str | None = None  # None: searched (sdpa, eager; seqkv's default for the model's dtype)
    build: str | None = None  # None: searched (loaded, cast); "legacy" in blobs before builds
    search: list = field(default_factory=list)  # the candidates tried, best first
    profile: dict = field(default_factory=dict)  # the numerics computed in (not a parameter)

    def __post_init__(self) -> None:
        if self.dtype is not None:
            self.dtype = dtype_alias(self.dtype, "predictor dtype")
        if self.attn is not None and self.attn not in ATTENTION:
            raise SeqkvError(f"predictor attention must be one of {', '.join(ATTENTION)}, "
                             f"not {self.attn!r}")
        if self.build is not None and self.build not in (*BUILDS, "legacy"):
            raise SeqkvError(f"predictor build must be one of {', '.join(BUILDS)}, "
                             f"not {self.build!r}")
        self._ranked: list = []

    def describe(self, config=None) -> dict:
        return {"name": self.name, "compute": 1.0, "numerics": self.profile}

    def params(self) -> dict:
        return {"dtype": self.dtype, "attn": self.attn, "build": self.build,
                "search": self.search}

    def model(self, lm: LoadedModel):
        if self.attn is None:
            use_repeatable_attention(lm)
        if self.build in (None, "legacy"):  # blobs written before builds were recorded
            return lm.variant(self.dtype, self.attn)
        return variant(lm, self.dtype or dtype_of(lm.model), self.build, self.attn)

    def numerics(self, lm: LoadedModel) -> dict:
        model = self.model(lm)
        out = {
            "procedure": "prefill-v1",
            "device": device_label(lm.device),
            "dtype": dtype_of(model),
            "attn": str(model.config._attn_implementation or "default"),
        }
        if self.build not in (None, "legacy"):
            out["build"] = self.build
        return out

    def side_info(self, kv: KVCache, lm: LoadedModel | None) -> bytes:
        if None in (self.dtype, self.attn, self.build) and kv.input_ids and kv.tensors:
            self._choose(kv, lm)
        elif self.build is None:
            self.build = "loaded"
        self.profile = self.numerics(lm)
        return b""

    def _choose(self, kv: KVCache, lm: LoadedModel) -> None:
        """Search the numerics left open on the first layers; keep the cheapest."""
        stored = max(kv.tensors, key=lambda t: t.numel()).dtype
        cands = candidates(lm, stored, self.dtype, self.attn, self.build)

        def run(c, n_layers):
            return prefill_kv(Recompute(c.dtype, c.attn, c.build).model(lm), kv.input_ids,
                              n_layers)

        self._ranked = search(lm, kv.tensors, kv.input_ids, cands, run)
        self.search = [c.record() for c in self._ranked]
        self._use(self._ranked[0])

    def _use(self, c) -> None:
        self.dtype, self.attn, self.build = c.dtype, c.attn, c.build

    def next_candidate(self, lm: LoadedModel) -> bool:
        if len(self._ranked) < 2:
            return False
        self._ranked.pop(0)
        self._use(self._ranked[0])
        self.profile = self.numerics(lm)
        return True

    def predict(self, lm, ids, side: bytes, layout: Layout) -> list[torch.Tensor]:
        here = self.numerics(lm)
        if self.profile and here != self.profile:
            raise ModelMismatchError(f"blob was coded with predictor numerics {self.profile}; "
                                     f"this machine has {here}")
        if not ids:
            return [torch.zeros(shape, dtype=dtype) for shape, dtype in layout]
        return check_layout(prefill_kv(self.model(lm), ids), layout, self.name)


__all__ = ["ATTENTION", "DTYPE_ALIASES", "Recompute"]
