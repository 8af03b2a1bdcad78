"""The delta tier: a KV cache stored as residuals from a predictor, plus its tokens.

Blob kind ``kv-delta``; sections: tokens (a token-tier blob, or raw int32 ids), predictor side
information, block models, range-coded symbols, raw residual bits, lossy escapes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .. import __version__
from ..blob import pack, unpack
from ..errors import BlobError, ModelMismatchError, SeqkvError
from ..models import LoadedModel
from . import residual_coding as rc
from .cachefile import FLOAT_DTYPES, KVCache, dtype_name, int_view
from .predictors import get_predictor, params_of, predictor_from_header

KIND = "kv-delta"
SECTIONS = ("tokens", "side", "models", "words", "raw", "escapes")


def tensors_hash(tensors: list[torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(f"{dtype_name(t.dtype)}{tuple(t.shape)}".encode())
        h.update(int_view(t.detach().cpu()).numpy().tobytes())
    return h.hexdigest()


def _layout(header: dict):
    try:
        return [(tuple(int(s) for s in shape), FLOAT_DTYPES[dt]) for shape, dt in header["layout"]]
    except (KeyError, TypeError, ValueError) as e:
        raise BlobError(f"corrupt kv-delta header (layout: {e})") from e


def _encode_tokens(lm: LoadedModel | None, ids: list[int], tokens: str) -> tuple[str, bytes]:
    if tokens == "coded" and lm is not None and ids:
        from ..compress import compress_tokens

        return "coded", compress_tokens(lm, ids)
    if tokens not in ("coded", "raw"):
        raise SeqkvError(f"tokens must be 'coded' or 'raw', not {tokens!r}")
    return "raw", np.asarray(ids, dtype="<i4").tobytes()


def _decode_tokens(lm: LoadedModel | None, header: dict, data: bytes) -> list[int]:
    from ..compress import decompress_tokens, token_hash

    if header["tokens"]["coding"] == "coded":
        if lm is None:
            raise SeqkvError("this blob's tokens are coded under a model: pass the model")
        ids = decompress_tokens(lm, data)
    else:
        if len(data) % 4:
            raise BlobError("corrupt kv-delta blob (token section)")
        ids = np.frombuffer(data, dtype="<i4").astype(np.int64).tolist()
    if token_hash(ids) != header["tokens"]["hash"]:
        raise BlobError("decoded tokens do not match the stored hash")
    return ids


def compress_kv(
    kv: KVCache,
    lm: LoadedModel | None = None,
    predictor: str = "recompute",
    *,
    max_abs_error: float | None = None,
    tokens: str = "coded",
    **predictor_params,
) -> bytes:
    """A cache to a kv-delta blob: exact (default), or within ``max_abs_error`` per value."""
    from ..compress import token_hash

    p = get_predictor(predictor, **predictor_params)
    if p.needs_model and lm is None:
        raise SeqkvError(f"the {predictor} predictor needs the model")
    if max_abs_error is not None and not (max_abs_error > 0 and np.isfinite(max_abs_error)):
        raise SeqkvError(f"max_abs_error must be a positive number, got {max_abs_error}")
    originals = kv.tensors
    layout = [(tuple(t.shape), t.dtype) for t in originals]
    side = p.side_info(kv, lm)
    pred = p.predict(lm, kv.input_ids, side, layout)
    if max_abs_error is not None and pred is None:
        pred = [torch.zeros(s, dtype=d) for s, d in layout]
    blocks, offsets, nbits, escapes = [], [], [], bytearray()
    restored = []
    for i, x in enumerate(originals):
        if pred is None:
            planes = rc.byte_planes(x)
            for plane in planes:
                blocks.extend(rc.head_blocks(plane, x.shape))
            continue
        if max_abs_error is None:
            r = rc.to_ordered(x) - rc.to_ordered(pred[i])
        else:
            from .lossy import quantize_residual

            r, esc, recon = quantize_residual(x, pred[i], max_abs_error)
            rc.put_varints([len(esc[0])], escapes)
            escapes += esc[0].astype("<i8").tobytes() + esc[1]
            restored.append(recon)
        sym, off, nb = rc.residual_symbols(r)
        blocks.extend(rc.head_blocks(sym, x.shape))
        offsets.append(off)
        nbits.append(nb)
    coded = rc.encode_blocks(blocks)
    raw = rc.pack_bits(np.concatenate(offsets), np.concatenate(nbits)) if offsets else b""
    token_coding, token_data = _encode_tokens(lm, kv.input_ids, tokens)
    numel = kv.numel
    residual_bits = 8 * (len(side) + len(coded.models) + len(coded.words) + len(raw)
                         + len(escapes))
    header = {
        "kind": KIND,
        "seqkv": __version__,
        "torch": torch.__version__,
        "mode": "exact" if max_abs_error is None else "lossy",
        "max_abs_error": max_abs_error,
        "predictor": {**p.describe(lm.config if lm else None), **params_of(p)},
        "model": lm.fingerprint.to_dict() if lm is not None else None,
        "layout": [[list(s), dtype_name(d)] for s, d in layout],
        "tokens": {"n": kv.n_tokens, "coding": token_coding, "hash": token_hash(kv.input_ids),
                   "bits": 8 * len(token_data)},
        "components": numel,
        "raw_bits": sum(t.numel() * t.element_size() * 8 for t in originals),
        "residual_bits": residual_bits,
        "tensors_hash": tensors_hash(originals if max_abs_error is None else restored),
        "prediction_hash": tensors_hash(pred) if pred is not None else None,
        "stream_bytes": [len(coded.models), len(coded.words), len(raw), len(escapes)],
    }
    return pack(header, [token_data, side, coded.models, coded.words, raw, bytes(escapes)])


def parse(blob: bytes) -> tuple[dict, dict[str, bytes]]:
    header, sections = unpack(blob)
    if header.get("kind") != KIND:
        raise BlobError(f"not a kv-delta blob (kind {header.get('kind')!r})")
    if len(sections) != len(SECTIONS):
        raise BlobError("corrupt kv-delta blob (sections)")
    for key in ("layout", "tokens", "predictor", "tensors_hash", "mode", "components"):
        if key not in header:
            raise BlobError(f"corrupt kv-delta header (no {key})")
    named = dict(zip(SECTIONS, sections, strict=True))
    if header.get("stream_bytes") != [len(named[k]) for k in SECTIONS[2:]]:
        raise BlobError("corrupt kv-delta blob (residual stream lengths)")
    return header, named


def decompress_kv(blob: bytes, lm: LoadedModel | None = None) -> KVCache:
    """A kv-delta blob back to its cache (bit for bit in exact mode)."""
    header, sec = parse(blob)
    layout = _layout(header)
    try:
        p = predictor_from_header(header["predictor"])
    except (KeyError, TypeError) as e:
        raise BlobError(f"corrupt kv-delta header (predictor: {e})") from e
    needs_model = p.needs_model or header["tokens"]["coding"] == "coded"
    if needs_model:
        if lm is None:
            raise SeqkvError(f"this blob needs the model it was written with "
                             f"({(header.get('model') or {}).get('name')})")
        problem = lm.fingerprint.mismatch(header.get("model") or {}, tokenizer=False)
        if problem:
            raise ModelMismatchError(problem)
    ids = _decode_tokens(lm, header, sec["tokens"])
    if any(s[2] > len(ids) for s, _ in layout):
        raise BlobError("corrupt kv-delta header (more positions than tokens)")
    pred = p.predict(lm, ids, sec["side"], layout)
    lossy = header["mode"] == "lossy"
    if lossy and pred is None:
        pred = [torch.zeros(s, dtype=d) for s, d in layout]
    if pred is not None and tensors_hash(pred) != header.get("prediction_hash"):
        raise ModelMismatchError(
            f"this machine's {p.name} prediction differs from the compressing machine's "
            f"(numerics {header['predictor'].get('numerics')}): it cannot restore this blob"
        )
    sizes = []
    for shape, dtype in layout:
        n = int(np.prod(shape))
        heads = shape[1]
        per = [n // heads] * heads if heads else []
        sizes.extend(per * (rc.width_of(dtype) // 8) if pred is None else per)
    blocks = rc.decode_checked(rc.CodedBlocks(sec["models"], sec["words"]), sizes)
    out, pos = [], 0
    syms, shapes = [], []
    for shape, dtype in layout:
        heads = shape[1]
        if pred is None:
            planes = []
            for _ in range(rc.width_of(dtype) // 8):
                planes.append(np.concatenate(blocks[pos:pos + heads]) if heads else
                              np.zeros(0, np.int64))
                pos += heads
            out.append(rc.from_byte_planes(planes, dtype, shape))
        else:
            syms.append(np.concatenate(blocks[pos:pos + heads]) if heads else
                        np.zeros(0, np.int64))
            shapes.append((shape, dtype))
            pos += heads
    if pred is not None:
        nbits = [rc.raw_bit_counts(s) for s in syms]
        allbits = np.concatenate(nbits) if nbits else np.zeros(0, np.int64)
        offsets = rc.unpack_bits(sec["raw"], allbits)
        reader = rc.VarintReader(sec["escapes"])
        start = 0
        for i, (s, (shape, dtype)) in enumerate(zip(syms, shapes, strict=True)):
            nbig = int((s >= rc._BIG0).sum())
            off = offsets[start:start + nbig]
            start += nbig
            r = rc.symbols_to_residuals(s, off)
            if lossy:
                from .lossy import dequantize_residual

                out.append(dequantize_residual(r, pred[i], header["max_abs_error"], reader))
            else:
                out.append(rc.from_ordered(rc.to_ordered(pred[i]) + r, dtype, shape))
    restored = KVCache.from_tensors(ids, out)
    if tensors_hash(out) != header["tensors_hash"]:
        raise BlobError("restored tensors do not match the stored hash (corrupt residuals)")
    return restored


def inspect_delta_blob(blob: bytes) -> dict:
    """What a kv-delta blob holds, from its header and section sizes (no model needed)."""
    header, sec = parse(blob)
    n = int(header["tokens"]["n"])
    comps = int(header["components"])
    res_bits = 8 * sum(len(sec[k]) for k in ("side", "models", "words", "raw", "escapes"))
    tok_bits = 8 * len(sec["tokens"])
    raw_bits = int(header["raw_bits"])
    total = 8 * len(blob)
    return {
        "kind": KIND,
        "mode": header["mode"],
        "max_abs_error": header.get("max_abs_error"),
        "predictor": header["predictor"],
        "model": (header.get("model") or {}).get("name"),
        "tokens": n,
        "components": comps,
        "layers": len(header["layout"]) // 2,
        "dtypes": sorted({d for _, d in header["layout"]}),
        "bytes": len(blob),
        "raw_kv_bits": raw_bits,
        "residual": {
            "bits": res_bits,
            "bits_per_component": res_bits / comps if comps else 0.0,
            "bits_per_token": res_bits / n if n else 0.0,
            "side_bits": 8 * len(sec["side"]),
            "model_bits": 8 * len(sec["models"]),
        },
        "tokens_part": {
            "coding": header["tokens"]["coding"],
            "bits": tok_bits,
            "bits_per_component": tok_bits / comps if comps else 0.0,
            "bits_per_token": tok_bits / n if n else 0.0,
        },
        "bits_per_component": total / comps if comps else 0.0,
        "bits_per_token": total / n if n else 0.0,
        "ratio": raw_bits / total if total else None,
        "ratio_residual_only": raw_bits / res_bits if res_bits else None,
    }
