"""Predictors of a KV cache for the delta tier: one small interface (base.py's
:class:`Predictor`), one predictor per file, chosen by name.

- ``recompute``: the model's own prefill on the restoring machine (one prefill of compute);
- ``quantized``: a per-vector quantized copy stored as side information (seqkv.quant);
- ``neighbour``: the previous position of the same channel; exact mode only;
- ``none``: no prediction, plain entropy coding of the bit patterns.
"""

from __future__ import annotations

from ...core.errors import SeqkvError
from .base import Layout, Predictor, check_layout
from .neighbour import Neighbour
from .none import NoPredictor
from .quantized import QuantizedCopy
from .recompute import ATTENTION, Recompute

PREDICTORS: dict[str, type[Predictor]] = {
    "recompute": Recompute, "quantized": QuantizedCopy, "neighbour": Neighbour,
    "none": NoPredictor,
}


def get_predictor(name: str, **params) -> Predictor:
    """A predictor by name, with its parameters (``recompute``: dtype, attn, build;
    ``quantized``: method, bits)."""
    try:
        cls = PREDICTORS[name]
    except KeyError:
        raise SeqkvError(f"unknown predictor {name!r}; known: {', '.join(PREDICTORS)}") from None
    try:
        return cls(**params)
    except TypeError as e:
        raise SeqkvError(f"predictor {name}: {e}") from None


def predictor_from_options(name: str, *, dtype: str | None = None, attn: str | None = None,
                           method: str = "int8", bits: float | None = None) -> Predictor:
    """A predictor from options offered for all of them at once (the CLI's): each takes the
    ones it has (recompute: dtype, attn; quantized: method, bits) and ignores the rest."""
    if name == "recompute":
        return get_predictor(name, dtype=dtype, attn=attn)
    if name == "quantized":
        return get_predictor(name, method=method, bits=bits)
    return get_predictor(name)


def predictor_from_header(d: dict) -> Predictor:
    """The predictor a (checked) kv-delta header records, with its numerics profile."""
    params = {k: v for k, v in d.items() if k not in ("name", "compute", "numerics")}
    if d["name"] == "recompute" and "build" not in params:
        params["build"] = "legacy"  # written before builds were recorded: as it was computed then
    p = get_predictor(d["name"], **params)
    if "numerics" in d and isinstance(p, Recompute):
        p.profile = dict(d["numerics"])
    return p


__all__ = [
    "ATTENTION",
    "PREDICTORS",
    "Layout",
    "NoPredictor",
    "Neighbour",
    "Predictor",
    "QuantizedCopy",
    "Recompute",
    "check_layout",
    "get_predictor",
    "predictor_from_header",
    "predictor_from_options",
]
