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

from ..errors import BlobError, ModelMismatchError, SeqkvError
from ..models import LoadedModel
from .cachefile import KVCache

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

    ``dtype`` and ``attn`` pick the numerics (a cast copy of the model, an attention path):
    run in the serving engine's dtype and kernels, the prediction can equal the cache bit
    for bit. Exact restores need the compressing and restoring machines to compute the same
    prediction: the numerics are recorded and a hash of the prediction is checked.
    """

    name: str = "recompute"
    needs_model: bool = True
    along_positions: bool = False
    dtype: str | None = None  # None: lm's dtype
    attn: str | None = None  # None: seqkv's repeatable default (eager on GPUs)
    profile: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dtype = compute_dtype(self.dtype)
        if self.attn is not None and self.attn not in ATTENTION:
            raise SeqkvError(f"predictor attention must be one of {', '.join(ATTENTION)}, "
                             f"not {self.attn!r}")

    def describe(self, config=None) -> dict:
        return {"name": self.name, "compute": 1.0, "numerics": self.profile}

    def model(self, lm: LoadedModel):
        from ..stepper import use_repeatable_attention

        if self.attn is None:
            use_repeatable_attention(lm)
        return lm.variant(self.dtype, self.attn)

    def numerics(self, lm: LoadedModel) -> dict:
        from ..stepper import device_label

        model = self.model(lm)
        return {
            "procedure": "prefill-v1",
            "device": device_label(lm.device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "attn": str(model.config._attn_implementation or "default"),
        }

    # Kernels may not repeat bit for bit from run to run: on the H200 host's CPU (16 threads)
    # one fp32 restore of four computed another prediction than its compress had (refused by
    # the prediction hash, no wrong data). So compress checks a second run, and restore retries.
    repeat_check = True
    restore_attempts = 3

    def side_info(self, kv: KVCache, lm: LoadedModel | None) -> bytes:
        self.profile = self.numerics(lm)
        return b""

    def predict(self, lm, ids, side: bytes, layout: Layout) -> list[torch.Tensor] | None:
        from ..compress import prefill_cache

        here = self.numerics(lm)
        if self.profile and here != self.profile:
            raise ModelMismatchError(f"blob was coded with predictor numerics {self.profile}; "
                                     f"this machine has {here}")
        if not ids:
            return [torch.zeros(shape, dtype=dtype) for shape, dtype in layout]
        cache = prefill_cache(self.model(lm), ids).cache
        pred = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return check_layout(pred, layout, self.name)


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
    p = get_predictor(d["name"], **params)
    if "numerics" in d and hasattr(p, "profile"):
        p.profile = dict(d["numerics"])
    return p


def params_of(p) -> dict:
    skip = ("name", "needs_model", "along_positions", "profile")
    return {k: v for k, v in asdict(p).items() if k not in skip}
