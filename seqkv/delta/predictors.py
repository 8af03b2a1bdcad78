"""Predictors of a KV cache: what the restoring side can compute (or cheaply be told) about it.

Each predictor is a small dataclass: ``side_info(kv)`` is what it needs stored (charged to the
residual part), ``predict(...)`` the prediction in the stored dtypes and shapes (or None:
code the bit patterns themselves). ``compute`` states its cost as a fraction of one full
prefill of the model (the forward FLOPs without the LM head, which prefill_cache skips).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..errors import ModelMismatchError, SeqkvError
from ..models import LoadedModel
from .cachefile import KVCache

Layout = list[tuple[tuple[int, ...], torch.dtype]]


def layer_flops(config) -> tuple[float, float]:
    """(multiply-adds per token of one decoder layer, of its K and V projections)."""
    cfg = config.get_text_config()
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or h // heads
    kv = 2 * h * kv_heads * d
    layer = 2 * h * heads * d + kv + 3 * h * cfg.intermediate_size
    return float(layer), float(kv)


def _profile(lm: LoadedModel, model=None) -> dict:
    from ..stepper import device_label, use_repeatable_attention

    use_repeatable_attention(lm)
    model = model if model is not None else lm.model
    return {
        "procedure": "prefill-v1",
        "device": device_label(lm.device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn": str(getattr(model.config, "_attn_implementation", None) or "default"),
    }


_CASTS: dict = {}


def model_in(lm: LoadedModel, dtype: str | None):
    """lm's model, or a copy cast to ``dtype`` (kept for reuse while lm lives)."""
    if dtype is None or dtype == lm.fingerprint.dtype:
        return lm.model
    import copy

    key = (id(lm.model), dtype)
    if key not in _CASTS:
        _CASTS.clear()
        _CASTS[key] = copy.deepcopy(lm.model).to(getattr(torch, dtype))
    return _CASTS[key]


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

    def describe(self, config=None) -> dict:
        return {"name": self.name, "compute": 0.0}

    def side_info(self, kv: KVCache, lm: LoadedModel | None) -> bytes:
        return b""

    def predict(self, lm, ids, side: bytes, layout: Layout) -> list[torch.Tensor] | None:
        return None


@dataclass
class Recompute:
    """The model's own prefill of the tokens on the restoring machine, cast to the stored dtype
    (arXiv 2604.15356 §4, layer two). Cost: one full prefill. Exact restores need the
    compressing and restoring machines to compute the same prediction: the numerics are
    recorded and a hash of the prediction is checked."""

    name: str = "recompute"
    needs_model: bool = True
    dtype: str | None = None  # compute in this dtype (a cast copy of the model); None: lm's
    profile: dict = field(default_factory=dict)

    def describe(self, config=None) -> dict:
        return {"name": self.name, "compute": 1.0, "numerics": self.profile}

    def side_info(self, kv: KVCache, lm: LoadedModel | None) -> bytes:
        self.profile = _profile(lm, model_in(lm, self.dtype))
        return b""

    def predict(self, lm, ids, side: bytes, layout: Layout) -> list[torch.Tensor] | None:
        from ..compress import prefill_cache

        model = model_in(lm, self.dtype)
        here = _profile(lm, model)
        if self.profile and here != self.profile:
            raise ModelMismatchError(f"blob was coded with predictor numerics {self.profile}; "
                                     f"this machine has {here}")
        if not ids:
            return [torch.zeros(shape, dtype=dtype) for shape, dtype in layout]
        cache = prefill_cache(model, ids).cache
        pred = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return check_layout(pred, layout, self.name)


PREDICTORS = {"none": NoPredictor, "recompute": Recompute}


def get_predictor(name: str, **params) -> object:
    try:
        cls = PREDICTORS[name]
    except KeyError:
        raise SeqkvError(f"unknown predictor {name!r}; known: {', '.join(PREDICTORS)}") from None
    return cls(**params)


def predictor_from_header(d: dict):
    params = {k: v for k, v in d.items() if k not in ("name", "compute", "numerics")}
    p = get_predictor(d["name"], **params)
    if "numerics" in d and hasattr(p, "profile"):
        p.profile = dict(d["numerics"])
    return p


def params_of(p) -> dict:
    return {k: v for k, v in asdict(p).items() if k not in ("name", "needs_model", "profile")}
