"""Per-vector KV quantizers behind one narrow interface: TurboQuant, KIVI, FP8, int8.

``get_quantizer("turboquant-mse", bits=3)`` builds one by name; ``get_kv_quantizer`` builds a
key/value pair with separate bit widths. Every quantizer returns a :class:`QuantizedTensor`
whose ``.bits`` is its true storage cost.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import SeqkvError
from .base import (
    KVQuantizer,
    QuantizedTensor,
    Quantizer,
)
from .fp8 import FP8, Int8
from .kivi import KIVI
from .lloyd_max import Codebook, lloyd_max_codebook
from .turboquant import TurboQuantMSE, TurboQuantOutlier, TurboQuantProd

METHODS = ("turboquant-mse", "turboquant-prod", "kivi", "fp8", "int8")


def get_quantizer(name: str, bits: float | None = None, **kwargs: Any) -> Quantizer:
    """A quantizer by method name. Fractional TurboQuant bits (2.5, 3.5) use the outlier split."""
    if name in ("turboquant-mse", "turboquant-prod", "turboquant-outlier"):
        b = 3 if bits is None else bits
        if name == "turboquant-outlier" or float(b) != int(b):
            if name == "turboquant-prod":
                raise SeqkvError(
                    "turboquant-prod takes integer bits (the outlier split is mse-only)"
                )
            return TurboQuantOutlier(bits=float(b), **kwargs)
        cls = TurboQuantMSE if name == "turboquant-mse" else TurboQuantProd
        return cls(bits=int(b), **kwargs)
    if name == "kivi":
        return KIVI(bits=2 if bits is None else _int_bits(name, bits), **kwargs)
    if name in ("fp8", "int8"):
        if bits not in (None, 8):
            raise SeqkvError(f"{name} stores 8 bits per component, not {bits}")
        return FP8(**kwargs) if name == "fp8" else Int8(**kwargs)
    raise SeqkvError(f"unknown quantizer {name!r}; known: {', '.join(METHODS)}")


def get_kv_quantizer(
    name: str, key_bits: float | None = None, value_bits: float | None = None, **kwargs: Any
) -> KVQuantizer:
    """Key and value quantizers of one method with separate bit widths (KIVI: K per channel)."""
    if name == "kivi":
        return KVQuantizer(
            get_quantizer(name, key_bits, axis="channel", **kwargs),
            get_quantizer(name, value_bits, axis="token", **kwargs),
        )
    return KVQuantizer(
        get_quantizer(name, key_bits, **kwargs), get_quantizer(name, value_bits, **kwargs)
    )


def _int_bits(name: str, bits: float) -> int:
    if float(bits) != int(bits):
        raise SeqkvError(f"{name} takes integer bits, got {bits}")
    return int(bits)


__all__ = [
    "FP8",
    "KIVI",
    "METHODS",
    "Codebook",
    "Int8",
    "KVQuantizer",
    "QuantizedTensor",
    "Quantizer",
    "TurboQuantMSE",
    "TurboQuantOutlier",
    "TurboQuantProd",
    "get_kv_quantizer",
    "get_quantizer",
    "lloyd_max_codebook",
]
