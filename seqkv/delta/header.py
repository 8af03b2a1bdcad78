"""The kv-delta header schema: every field checked for its type, its range and its agreement
with the sections, before any of it is used.

A header is JSON under a valid checksum, so a damaged or hand-edited one reaches the reader
intact: every field is read through :func:`read_header`, which gives a :class:`DeltaHeader`
or raises BlobError (nothing else). Sizes the header states (components, raw and residual
bits, token bits) must equal what the layout and the sections give, so ``inspect`` never
reports a stated figure that the blob does not bear out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..core.cache import FLOAT_DTYPES
from ..core.errors import BlobError, SeqkvError

KIND = "kv-delta"
SECTIONS = ("tokens", "side", "models", "words", "raw", "lossy")
RESIDUAL_SECTIONS = ("side", "models", "words", "raw", "lossy")
CODED_FLAGS = {"0": 0, "1": 1, "2": 2}  # no symbols, coded symbols, all-zero residual
TOKEN_CODINGS = ("coded", "raw", "external")
MAX_TENSORS = 1 << 20
MAX_DIM = 1 << 31
MAX_COMPONENTS = 1 << 40
_HASH = re.compile(r"^[0-9a-f]{32}$")
_SHORT = 256  # longest free-text field (versions, names, devices)

Layout = list[tuple[tuple[int, ...], torch.dtype]]


def _bad(what: str) -> BlobError:
    return BlobError(f"corrupt kv-delta header ({what})")


def _int(v, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _bad(what)
    return v


def _num(v, what: str, positive: bool = False) -> float:
    if type(v) not in (int, float) or not math.isfinite(v) or (positive and not v > 0):
        raise _bad(what)
    return float(v)


def _str(v, what: str, choices=None) -> str:
    if not isinstance(v, str) or len(v) > _SHORT or (choices is not None and v not in choices):
        raise _bad(what)
    return v


def _hash(v, what: str) -> str:
    if not isinstance(v, str) or not _HASH.match(v):
        raise _bad(what)
    return v


def _dict(v, what: str, required=(), optional=()) -> dict:
    if not isinstance(v, dict) or not set(required) <= set(v) or set(v) - {*required, *optional}:
        raise _bad(what)
    return v


@dataclass(frozen=True)
class Tokens:
    n: int
    coding: str
    hash: str
    bits: int


@dataclass(frozen=True)
class DeltaHeader:
    """A checked kv-delta header, its fields read as attributes."""

    mode: str  # "exact" or "lossy"
    lossy: dict | None  # {"max_abs_error": E} or {"rel_mse": R, "method": M}; None when exact
    max_abs_error: float | None
    predictor: dict  # the predictor's name, compute and parameters, checked per predictor
    model: dict | None  # the model's fingerprint (name, weights, tokenizer, dtype)
    layout: Layout  # each tensor's shape and dtype (stored run-length coded)
    coded: list[int]  # per tensor: 0 no symbols, 1 coded symbols, 2 all-zero residual
    tokens: Tokens
    components: int
    raw_bits: int
    residual_bits: int
    tensors_hash: str
    prediction_hash: str | None
    stream_bytes: list[int]
    seqkv: str
    torch: str


def read_layout(runs) -> Layout:
    if not isinstance(runs, list):
        raise _bad("layout")
    out: Layout = []
    for run in runs:
        if not isinstance(run, list) or len(run) != 3:
            raise _bad("layout")
        shape, dt, count = run
        if not isinstance(shape, list) or len(shape) != 4 or shape[0] != 1:
            raise _bad("layout: shape")
        dims = tuple(_int(s, "layout: shape", 0, MAX_DIM) for s in shape)
        dtype = FLOAT_DTYPES.get(_str(dt, "layout: dtype"))
        if dtype is None:
            raise _bad("layout: dtype")
        count = _int(count, "layout: count", 1, MAX_TENSORS)
        if len(out) + count > MAX_TENSORS:
            raise _bad("layout: count")
        out += [(dims, dtype)] * count
    if len(out) % 2:
        raise _bad("layout: keys without values")
    for k, v in zip(out[0::2], out[1::2], strict=True):
        if k[0][:3] != v[0][:3]:
            raise _bad("layout: keys and values disagree")
    return out


def _read_lossy(mode: str, lossy, max_abs, digest) -> tuple[dict | None, float | None]:
    if mode == "exact":
        if lossy is not None or max_abs is not None:
            raise _bad("an exact blob with a lossy bound")
        return None, None
    if "max_abs_error" in (lossy if isinstance(lossy, dict) else {}):
        d = _dict(lossy, "lossy", ("max_abs_error",))
        bound = _num(d["max_abs_error"], "lossy: max_abs_error", positive=True)
        if type(max_abs) not in (int, float) or float(max_abs) != bound:
            raise _bad("max_abs_error")
        return {"max_abs_error": d["max_abs_error"]}, bound
    from ..quant import METHODS

    d = _dict(lossy, "lossy", ("rel_mse", "method"))
    _num(d["rel_mse"], "lossy: rel_mse", positive=True)
    _str(d["method"], "lossy: method", METHODS)
    if max_abs is not None:
        raise _bad("max_abs_error")
    if digest != lossy_digest(d):
        raise _bad("lossy_digest")
    return dict(d), None


def lossy_digest(lossy: dict) -> str:
    """A digest of a relative-MSE bound. The decoder never uses the bound (the payload holds
    the quantized residuals), so no decode can tell an edited one; with the digest an edit
    must be matched by hand rather than slip through as the blob's own claim."""
    import hashlib
    import json

    data = json.dumps(lossy, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


_NUMERICS_KEYS = ("procedure", "device", "dtype", "attn", "build")
_SEARCH_KEYS = ("dtype", "attn", "build", "bits_per_component", "exact")


def _read_predictor(d) -> dict:
    from .predictors import PREDICTORS

    name = _str((d if isinstance(d, dict) else {}).get("name"), "predictor: name", PREDICTORS)
    if name in ("none", "neighbour"):
        _dict(d, "predictor", ("name", "compute"))
    elif name == "quantized":
        _read_quantized_copy(d)
    else:
        _read_recompute(d)
    expected = 1.0 if name == "recompute" else 0.0
    if _num(d["compute"], "predictor: compute") != expected:
        raise _bad("predictor: compute")
    return d


def _read_quantized_copy(d) -> None:
    from ..quant import METHODS

    _dict(d, "predictor", ("name", "compute", "method", "bits"))
    _str(d["method"], "predictor: method", METHODS)
    bits = d["bits"]
    if bits is not None and (_num(bits, "predictor: bits") * 2 != int(bits * 2)
                             or not 1 <= bits <= 8):
        raise _bad("predictor: bits")


def _read_recompute(d) -> None:
    from ..core.cache import DTYPE_ALIASES
    from .numerics import BUILDS
    from .predictors import ATTENTION

    _dict(d, "predictor", ("name", "compute", "numerics", "dtype", "attn"), ("build", "search"))
    for key, choices in (("dtype", DTYPE_ALIASES), ("attn", ATTENTION)):
        if d[key] is not None:
            _str(d[key], f"predictor: {key}", choices)
    if "build" in d:
        _str(d["build"], "predictor: build", BUILDS)
    numerics = _dict(d["numerics"], "predictor: numerics", (), _NUMERICS_KEYS)
    for key, v in numerics.items():
        _str(v, f"predictor: numerics {key}")
    search = d.get("search", [])
    if not isinstance(search, list) or len(search) > 64:
        raise _bad("predictor: search")
    for rec in search:
        _dict(rec, "predictor: search", _SEARCH_KEYS)
        _str(rec["dtype"], "predictor: search", DTYPE_ALIASES)
        if rec["attn"] is not None:
            _str(rec["attn"], "predictor: search", ATTENTION)
        _str(rec["build"], "predictor: search", BUILDS)
        if rec["bits_per_component"] is not None:
            _num(rec["bits_per_component"], "predictor: search")
        if type(rec["exact"]) is not bool:
            raise _bad("predictor: search")


def _read_model(d) -> dict | None:
    if d is None:
        return None
    _dict(d, "model", ("name", "weights", "tokenizer", "dtype"))
    for key in ("name", "weights", "tokenizer", "dtype"):
        _str(d[key], f"model: {key}")
    return d


def _read_tokens(t, size: int) -> Tokens:
    """The tokens field, against the size of the token section."""
    t = _dict(t, "tokens", ("n", "coding", "hash", "bits"))
    tokens = Tokens(_int(t["n"], "tokens: n", 0, MAX_DIM),
                    _str(t["coding"], "tokens: coding", TOKEN_CODINGS),
                    _hash(t["hash"], "tokens: hash"), _int(t["bits"], "tokens: bits"))
    if tokens.bits != 8 * size:
        raise _bad("tokens: bits")
    if ((tokens.coding == "raw" and 4 * tokens.n != size)
            or (tokens.coding == "external" and size)
            or (tokens.coding == "coded" and not size)):
        raise _bad("tokens: n")
    return tokens


def _read_sizes(header: dict, layout: Layout, sizes: dict[str, int]) -> tuple[int, int]:
    """Components and raw bits, computed from the layout and checked against the header's;
    the residual bits against the sections' sizes."""
    components = sum(int(torch.Size(s).numel()) for s, _ in layout)
    if components > MAX_COMPONENTS:
        raise _bad("layout: too large")
    raw_bits = sum(int(torch.Size(s).numel()) * 8 * d.itemsize for s, d in layout)
    if _int(header["components"], "components") != components:
        raise _bad("components")
    if _int(header["raw_bits"], "raw_bits") != raw_bits:
        raise _bad("raw_bits")
    if _int(header["residual_bits"], "residual_bits") != 8 * sum(sizes[k] for k in
                                                                  RESIDUAL_SECTIONS):
        raise _bad("residual_bits")
    return components, raw_bits


def read_header(header: dict, sections: list[bytes]) -> DeltaHeader:
    """The checked header of a kv-delta blob (its unpacked JSON and sections)."""
    if not isinstance(header, dict) or header.get("kind") != KIND:
        kind = header.get("kind") if isinstance(header, dict) else None
        raise BlobError(f"not a kv-delta blob (kind {str(kind)[:40]!r})")
    if len(sections) != len(SECTIONS):
        raise BlobError("corrupt kv-delta blob (sections)")
    for key in ("layout", "tokens", "predictor", "tensors_hash", "mode", "components", "coded",
                "raw_bits", "residual_bits", "stream_bytes", "lossy", "max_abs_error", "model",
                "prediction_hash", "seqkv", "torch"):
        if key not in header:
            raise _bad(f"no {key}")
    sizes = dict(zip(SECTIONS, (len(s) for s in sections), strict=True))
    stream = header["stream_bytes"]
    if (not isinstance(stream, list) or len(stream) != 4
            or any(type(n) is not int for n in stream)
            or stream != [sizes[k] for k in SECTIONS[2:]]):
        raise BlobError("corrupt kv-delta blob (residual stream lengths)")
    layout = read_layout(header["layout"])
    coded = header["coded"]
    if not isinstance(coded, str) or len(coded) != len(layout) or set(coded) - set(CODED_FLAGS):
        raise _bad("coded")
    components, raw_bits = _read_sizes(header, layout, sizes)
    tokens = _read_tokens(header["tokens"], sizes["tokens"])
    if any(s[2] > tokens.n for s, _ in layout):
        raise _bad("more positions than tokens")
    mode = _str(header["mode"], "mode", ("exact", "lossy"))
    lossy, max_abs = _read_lossy(mode, header["lossy"], header["max_abs_error"],
                                 header.get("lossy_digest"))
    predictor = _read_predictor(header["predictor"])
    if mode == "lossy" and predictor["name"] == "neighbour":
        raise _bad("a lossy blob with the neighbour predictor")
    prediction_hash = header["prediction_hash"]
    if prediction_hash is not None:
        _hash(prediction_hash, "prediction_hash")
    return DeltaHeader(
        mode=mode, lossy=lossy, max_abs_error=max_abs, predictor=predictor,
        model=_read_model(header["model"]), layout=layout,
        coded=[CODED_FLAGS[c] for c in coded], tokens=tokens, components=components,
        raw_bits=raw_bits, residual_bits=header["residual_bits"],
        tensors_hash=_hash(header["tensors_hash"], "tensors_hash"),
        prediction_hash=prediction_hash, stream_bytes=list(stream),
        seqkv=_str(header["seqkv"], "seqkv"), torch=_str(header["torch"], "torch"),
    )


def predictor_of(h: DeltaHeader):
    """The predictor a checked header names (its parameters already checked)."""
    from .predictors import predictor_from_header

    try:
        return predictor_from_header(h.predictor)
    except SeqkvError as e:
        raise _bad(f"predictor: {e}") from e


def lossy_mode_of(h: DeltaHeader):
    from .lossy import mode_from_header

    return mode_from_header(h.lossy) if h.mode == "lossy" else None
