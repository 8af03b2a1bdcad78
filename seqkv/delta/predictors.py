"""Predictors of a KV cache: what the restoring side can compute (or cheaply be told) about it.

Each predictor is a small dataclass. ``side_info(kv, lm)`` is what it needs stored (charged
to the residual part); ``predict(lm, ids, side, layout)`` is the prediction in the stored
dtypes and shapes, or None: code the bit patterns themselves. A predictor with
``along_positions`` predicts each position from the one before it (the residual is the
difference of consecutive bit patterns, undone by a running sum). ``describe`` states the
compute it costs as a fraction of one prefill of the model (forward multiply-adds without
the LM head, which prefill_cache skips).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..core.cache import KVCache
from ..core.errors import BlobError, ModelMismatchError, SeqkvError
from ..core.models import LoadedModel
from .numerics import BUILDS, candidates, dtype_of, prefill_kv, search, variant

Layout = list[tuple[tuple[int, ...], torch.dtype]]

DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                 "float": "float32", "bfloat16": "bfloat16", "float16": "float16",
                 "float32": "float32"}
ATTENTION = ("eager", "sdpa", "flash_attention_2")


def compute_dtype(name: str | None) -> str | None:
    if name is None:
        return None
    try:
        return DTYPE_ALIASES[name]
    except KeyError:
        raise SeqkvError(f"predictor dtype must be one of bf16, fp16, fp32, not {name!r}") from None


def check_layout(pred: list[torch.Tensor], layout: Layout, what: str) -> list[torch.Tensor]:
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


@dataclass
class NoPredictor:
    """Plain entropy coding of the bit patterns (byte planes): the baseline."""

    name: str = "none"
    needs_model: bool = False
    along_positions: bool = False
    repeat_check = False  # computed from the blob alone: nothing to repeat
    restore_attempts = 1

    def describe(self, config=None) -> dict:
        return {"name": self.name, "compute": 0.0}

    def side_info(self, kv: KVCache, lm: LoadedModel | None) -> bytes:
        return b""

    def predict(self, lm, ids, side: bytes, layout: Layout) -> list[torch.Tensor] | None:
        return None


@dataclass
class Neighbour(NoPredictor):
    """Each position predicted by the previous position of the same channel (DPCM along
    time): no compute, no side information. Exact mode only."""

    name: str = "neighbour"
    along_positions: bool = True


@dataclass
class Recompute:
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

    name: str = "recompute"
    needs_model: bool = True
    along_positions: bool = False
    dtype: str | None = None  # None: searched (the cache's dtype, the model's)
    attn: str | None = None  # None: searched (sdpa, eager; seqkv's default for the model's dtype)
    build: str | None = None  # None: searched (loaded, cast); "legacy" in blobs before builds
    search: list = field(default_factory=list)  # the candidates tried, best first
    profile: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dtype = compute_dtype(self.dtype)
        if self.attn is not None and self.attn not in ATTENTION:
            raise SeqkvError(f"predictor attention must be one of {', '.join(ATTENTION)}, "
                             f"not {self.attn!r}")
        if self.build is not None and self.build not in (*BUILDS, "legacy"):
            raise SeqkvError(f"predictor build must be one of {', '.join(BUILDS)}, "
                             f"not {self.build!r}")
        self._ranked: list = []

    def describe(self, config=None) -> dict:
        return {"name": self.name, "compute": 1.0, "numerics": self.profile}

    def model(self, lm: LoadedModel):
        from ..core.stepper import use_repeatable_attention

        if self.attn is None:
            use_repeatable_attention(lm)
        if self.build in (None, "legacy"):  # blobs written before builds were recorded
            return lm.variant(self.dtype, self.attn)
        return variant(lm, self.dtype or dtype_of(lm.model), self.build, self.attn)

    def numerics(self, lm: LoadedModel) -> dict:
        from ..core.stepper import device_label

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

    # Kernels may not repeat bit for bit from run to run: on the H200 host's CPU (16 threads)
    # one fp32 restore of four computed another prediction than its compress had (refused by
    # the prediction hash, no wrong data). So compress checks a second run, and restore retries.
    repeat_check = True
    restore_attempts = 3

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
            return prefill_kv(self._with(c).model(lm), kv.input_ids, n_layers)

        self._ranked = search(lm, kv.tensors, kv.input_ids, cands, run)
        self.search = [c.record() for c in self._ranked]
        self._use(self._ranked[0])

    def _with(self, c) -> Recompute:
        return Recompute(dtype=c.dtype, attn=c.attn, build=c.build)

    def _use(self, c) -> None:
        self.dtype, self.attn, self.build = c.dtype, c.attn, c.build

    def next_candidate(self, lm: LoadedModel) -> bool:
        """After the chosen numerics did not repeat: the next best searched one, if any."""
        if len(self._ranked) < 2:
            return False
        self._ranked.pop(0)
        self._use(self._ranked[0])
        self.profile = self.numerics(lm)
        return True

    def predict(self, lm, ids, side: bytes, layout: Layout) -> list[torch.Tensor] | None:
        here = self.numerics(lm)
        if self.profile and here != self.profile:
            raise ModelMismatchError(f"blob was coded with predictor numerics {self.profile}; "
                                     f"this machine has {here}")
        if not ids:
            return [torch.zeros(shape, dtype=dtype) for shape, dtype in layout]
        return check_layout(prefill_kv(self.model(lm), ids), layout, self.name)


@dataclass
class QuantizedCopy:
    """A per-vector quantized copy of the cache (seqkv.quant), stored as side information:
    no model compute, but its bits are charged to the residual part."""

    name: str = "quantized"
    needs_model: bool = False
    along_positions: bool = False
    repeat_check = False
    restore_attempts = 1
    method: str = "int8"
    bits: float | None = None

    def describe(self, config=None) -> dict:
        return {"name": self.name, "compute": 0.0}

    def _quantizer(self):
        from ..quant import get_quantizer

        return get_quantizer(self.method, self.bits)

    def side_info(self, kv: KVCache, lm: LoadedModel | None) -> bytes:
        from .residual_coding import put_varints

        q, out = self._quantizer(), bytearray()
        for t in kv.tensors:
            x = torch.nan_to_num(t.detach().cpu().float(), nan=0.0, posinf=0.0, neginf=0.0)
            data = q.quantize(x).to_bytes() if x.numel() else b""
            put_varints([len(data)], out)
            out += data
        return bytes(out)

    def predict(self, lm, ids, side: bytes, layout: Layout) -> list[torch.Tensor] | None:
        from ..quant import QuantizedTensor
        from .residual_coding import VarintReader

        q, reader, pred = self._quantizer(), VarintReader(side), []
        for shape, dtype in layout:
            n = reader.read()
            if reader.pos + n > len(side):
                raise BlobError("corrupt kv-delta blob (quantized copy)")
            data = side[reader.pos:reader.pos + n]
            reader.pos += n
            if not n:
                pred.append(torch.zeros(shape, dtype=dtype))
                continue
            qt = QuantizedTensor.from_bytes(data)
            pred.append(q.dequantize(qt).reshape(shape))
        if reader.pos != len(side):
            raise BlobError("corrupt kv-delta blob (quantized copy length)")
        return check_layout(pred, layout, self.name)


PREDICTORS = {"none": NoPredictor, "neighbour": Neighbour, "recompute": Recompute,
              "quantized": QuantizedCopy}


def get_predictor(name: str, **params) -> object:
    try:
        cls = PREDICTORS[name]
    except KeyError:
        raise SeqkvError(f"unknown predictor {name!r}; known: {', '.join(PREDICTORS)}") from None
    try:
        return cls(**params)
    except TypeError as e:
        raise SeqkvError(f"predictor {name}: {e}") from None


def predictor_from_header(d: dict):
    params = {k: v for k, v in d.items() if k not in ("name", "compute", "numerics")}
    if d["name"] == "recompute" and "build" not in params:
        params["build"] = "legacy"  # written before builds were recorded: as it was computed then
    p = get_predictor(d["name"], **params)
    if "numerics" in d and hasattr(p, "profile"):
        p.profile = dict(d["numerics"])
    return p


def params_of(p) -> dict:
    skip = ("name", "needs_model", "along_positions", "profile")
    return {k: v for k, v in asdict(p).items() if k not in skip}
