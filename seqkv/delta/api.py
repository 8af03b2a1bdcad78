"""The delta tier: a KV cache stored as residuals from a predictor, plus its tokens.

Blob kind ``kv-delta``; sections: tokens (a token-tier blob, raw int32 ids, or nothing when
they are kept elsewhere), predictor side information, block models, range-coded symbols, raw
residual bits, the lossy mode's per-tensor payloads (quantizer codes, escapes).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..core.blob import pack, unpack
from ..core.cache import KVCache, dtype_name, int_view, token_hash
from ..core.errors import BlobError, ModelMismatchError, SeqkvError
from ..core.models import LoadedModel
from ..core.version import __version__
from ..tokens.api import compress_tokens, decompress_tokens
from . import residual_coding as rc
from .header import (
    KIND,
    SECTIONS,
    DeltaHeader,
    lossy_digest,
    lossy_mode_of,
    predictor_of,
    read_header,
)
from .lossy import lossy_mode
from .predictors import Predictor, get_predictor

ZERO = 2  # "coded" value of a tensor whose residual is all zero (the prediction was exact)


def tensors_hash(tensors: list[torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(f"{dtype_name(t.dtype)}{tuple(t.shape)}".encode())
        h.update(int_view(t.detach().cpu()).numpy().tobytes())
    return h.hexdigest()


def _pack_layout(layout) -> list:
    """Shapes and dtypes run-length coded: [[shape, dtype, count], ...] (layers repeat)."""
    runs: list = []
    for shape, dtype in layout:
        entry = [list(shape), dtype_name(dtype)]
        if runs and runs[-1][:2] == entry:
            runs[-1][2] += 1
        else:
            runs.append([*entry, 1])
    return runs


def _encode_tokens(lm: LoadedModel | None, ids: list[int], tokens: str) -> tuple[str, bytes]:
    if tokens not in ("coded", "raw", "external"):
        raise SeqkvError(f"tokens must be 'coded', 'raw' or 'external', not {tokens!r}")
    if tokens == "external":  # kept elsewhere (the store's trie); only their hash is stored
        return "external", b""
    if tokens == "coded" and lm is not None and ids:
        return "coded", compress_tokens(lm, ids)
    return "raw", np.asarray(ids, dtype="<i4").tobytes()


def _decode_tokens(lm: LoadedModel | None, header: dict, data: bytes,
                   ids: list[int] | None) -> list[int]:
    coding = header.tokens.coding
    if coding == "external":
        if ids is None:
            raise SeqkvError("this blob's tokens are stored elsewhere: pass them (ids=...)")
        ids = list(ids)
    elif coding == "coded":
        if lm is None:
            raise SeqkvError("this blob's tokens are coded under a model: pass the model")
        ids = decompress_tokens(lm, data)
    else:
        if len(data) % 4:
            raise BlobError("corrupt kv-delta blob (token section)")
        ids = np.frombuffer(data, dtype="<i4").astype(np.int64).tolist()
    if token_hash(ids) != header.tokens.hash:
        raise BlobError("decoded tokens do not match the stored hash")
    return ids


def _prediction(p, lm, ids, side, layout) -> list[torch.Tensor] | None:
    """The prediction at compress time, computed twice where kernels may not repeat; searched
    numerics that do not repeat give way to the next best."""
    while True:
        pred = p.predict(lm, ids, side, layout)
        if pred is None or not p.repeat_check:
            return pred
        again = p.predict(lm, ids, side, layout)
        if tensors_hash(again) == tensors_hash(pred):
            return pred
        if not p.next_candidate(lm):
            raise SeqkvError(
                f"the {p.name} predictor is not repeatable on {lm.device} with numerics "
                f"{p.describe()['numerics']}: a restore could not reproduce it (try attn eager)"
            )


def _matching_prediction(p, lm, ids, side, layout, header) -> list[torch.Tensor] | None:
    """The prediction at restore time: it must hash as the compressing machine's did."""
    for _ in range(p.restore_attempts):
        pred = p.predict(lm, ids, side, layout)
        if pred is None or tensors_hash(pred) == header.prediction_hash:
            return pred
    if not p.needs_model:  # computed from the blob alone: the blob is damaged
        raise BlobError("corrupt kv-delta blob (predictor side information)")
    raise ModelMismatchError(
        f"this machine's {p.name} prediction differs from the compressing machine's "
        f"(numerics {header.predictor.get('numerics')}; {p.restore_attempts} attempts): "
        "it cannot restore this blob"
    )


def needs_model(p: Predictor, token_coding: str) -> bool:
    """Whether a kv-delta blob needs the model, to write or to restore: its predictor
    computes with the model, or its tokens are coded under it."""
    return p.needs_model or token_coding == "coded"


def compress_kv(
    kv: KVCache,
    lm: LoadedModel | None = None,
    predictor: str | Predictor = "recompute",
    *,
    max_abs_error: float | None = None,
    rel_mse: float | None = None,
    tokens: str = "coded",
    **predictor_params,
) -> bytes:
    """A cache to a kv-delta blob: exact (default), within ``max_abs_error`` per value, or
    within relative MSE ``rel_mse`` per tensor (residuals through seqkv.quant). ``predictor``:
    a name (with its parameters as keywords) or a :class:`Predictor`."""
    p = predictor if isinstance(predictor, Predictor) else get_predictor(predictor,
                                                                         **predictor_params)
    if p.needs_model and lm is None:
        raise SeqkvError(f"the {p.name} predictor needs the model")
    mode = lossy_mode(max_abs_error, rel_mse)
    if mode is not None and p.along_positions:
        raise SeqkvError(f"the {p.name} predictor is for exact mode only")
    originals = kv.tensors
    layout = [(tuple(t.shape), t.dtype) for t in originals]
    side = p.side_info(kv, lm)
    pred = _prediction(p, lm, kv.input_ids, side, layout)
    if mode is not None and pred is None:
        pred = [torch.zeros(s, dtype=d) for s, d in layout]
    blocks, offsets, nbits, payloads, restored, coded = [], [], [], bytearray(), [], []
    for i, x in enumerate(originals):
        if pred is None and not p.along_positions:
            keys = rc.block_keys(x.shape)
            for plane in rc.byte_planes(x):
                blocks.extend(rc.split_blocks(plane, *keys))
            coded.append(1)
            continue
        if p.along_positions:
            r = rc.position_deltas(rc.to_ordered(x), x.shape)
        elif mode is None:
            r = rc.to_ordered(x) - rc.to_ordered(pred[i])
        else:
            enc = mode.encode(x, pred[i])
            if enc is None:  # the bound is finer than the dtype: this tensor exactly
                r, payload, recon = rc.to_ordered(x) - rc.to_ordered(pred[i]), b"", x
            else:
                r, payload, recon = enc
            rc.put_varints([len(payload)], payloads)
            payloads += payload
            restored.append(recon)
        if r is None or not r.any():  # no symbols, or all zero: nothing to entropy-code
            coded.append(ZERO if r is not None else 0)
            continue
        coded.append(1)
        sym, off, nb = rc.residual_symbols(r)
        blocks.extend(rc.split_blocks(sym, *rc.block_keys(x.shape, None if pred is None
                                                          else pred[i])))
        offsets.append(off)
        nbits.append(nb)
    coded_blocks = rc.encode_blocks(blocks)
    raw = rc.pack_bits(np.concatenate(offsets), np.concatenate(nbits)) if offsets else b""
    token_coding, token_data = _encode_tokens(lm, kv.input_ids, tokens)
    residual_bits = 8 * (len(side) + len(coded_blocks.models) + len(coded_blocks.words)
                         + len(raw) + len(payloads))
    header = {
        "kind": KIND,
        "seqkv": __version__,
        "torch": torch.__version__,
        "mode": "exact" if mode is None else "lossy",
        "lossy": mode.describe() if mode is not None else None,
        "max_abs_error": max_abs_error,
        "predictor": {**p.describe(lm.config if lm else None), **p.params()},
        "model": lm.fingerprint.to_dict() if lm is not None else None,
        "layout": _pack_layout(layout),
        "coded": "".join(str(c) for c in coded),
        "tokens": {"n": kv.n_tokens, "coding": token_coding, "hash": token_hash(kv.input_ids),
                   "bits": 8 * len(token_data)},
        "components": kv.numel,
        "raw_bits": sum(t.numel() * t.element_size() * 8 for t in originals),
        "residual_bits": residual_bits,
        "tensors_hash": tensors_hash(originals if mode is None else restored),
        "prediction_hash": tensors_hash(pred) if pred is not None else None,
        "stream_bytes": [len(coded_blocks.models), len(coded_blocks.words), len(raw),
                         len(payloads)],
    }
    if mode is not None and "rel_mse" in header["lossy"]:
        header["lossy_digest"] = lossy_digest(header["lossy"])
    return pack(header, [token_data, side, coded_blocks.models, coded_blocks.words, raw,
                         bytes(payloads)])


def parse(blob: bytes) -> tuple[DeltaHeader, dict[str, bytes]]:
    """The checked header (seqkv.delta.header) and named sections of a kv-delta blob."""
    header, sections = unpack(blob)
    checked = read_header(header, sections)
    return checked, dict(zip(SECTIONS, sections, strict=True))


def decompress_kv(blob: bytes, lm: LoadedModel | None = None,
                  ids: list[int] | None = None) -> KVCache:
    """A kv-delta blob back to its cache (bit for bit in exact mode). ``ids``: the tokens,
    for a blob written with ``tokens="external"``."""
    header, sec = parse(blob)
    layout = header.layout
    p = predictor_of(header)
    mode = lossy_mode_of(header)
    if needs_model(p, header.tokens.coding):
        if lm is None:
            raise SeqkvError(f"this blob needs the model it was written with "
                             f"({(header.model or {}).get('name')})")
        problem = lm.fingerprint.mismatch(header.model or {}, tokenizer=False)
        if problem:
            raise ModelMismatchError(problem)
    ids = _decode_tokens(lm, header, sec["tokens"], ids)
    if len(ids) != header.tokens.n:
        raise BlobError("corrupt kv-delta header (tokens: n)")
    pred = _matching_prediction(p, lm, ids, sec["side"], layout, header)
    if mode is not None and pred is None:  # lossy without a predictor: residuals from zero
        pred = [torch.zeros(s, dtype=d) for s, d in layout]
    planes = pred is None and not p.along_positions
    syms = _symbols(sec, layout, header.coded, pred, planes)
    if planes:
        if any(s is None for s in syms):
            raise BlobError("corrupt kv-delta header (coded)")
        out = [rc.from_byte_planes(pl, dtype, shape) for pl, (shape, dtype) in
               zip(syms, layout, strict=True)]
    else:
        out = _residuals_back(sec, syms, layout, pred, p, mode)
    if tensors_hash(out) != header.tensors_hash:
        raise BlobError("restored tensors do not match the stored hash (corrupt residuals)")
    return KVCache.from_tensors(ids, out)


def _symbols(sec, layout, coded_flags, pred, planes: bool) -> list:
    """Each tensor's residual symbols from the range-coded blocks: a list per byte plane
    (plain coding), an array, or None where nothing was coded."""
    keys = [rc.block_keys(shape, None if pred is None else pred[i]) if coded == 1 else None
            for i, ((shape, _), coded) in enumerate(zip(layout, coded_flags, strict=True))]
    sizes = []
    for k, (_, dtype) in zip(keys, layout, strict=True):
        if k is not None:
            sizes.extend(rc.block_sizes(*k) * (rc.width_of(dtype) // 8 if planes else 1))
    blocks = rc.decode_checked(rc.CodedBlocks(sec["models"], sec["words"]), sizes)
    syms, pos = [], 0
    for k, (shape, dtype), coded in zip(keys, layout, coded_flags, strict=True):
        if k is None:
            if coded == ZERO and planes:  # never written: plain coding has no prediction
                raise BlobError("corrupt kv-delta header (coded)")
            zeros = np.zeros(int(np.prod(shape)), np.int64)
            syms.append(rc.residual_symbols(zeros)[0] if coded == ZERO else None)
            continue
        per_plane = []
        for _ in range(rc.width_of(dtype) // 8 if planes else 1):
            per_plane.append(rc.join_blocks(blocks[pos:pos + k[1]], k[0]))
            pos += k[1]
        syms.append(per_plane if planes else per_plane[0])
    return syms


def _residuals_back(sec, syms, layout, pred, p, mode) -> list[torch.Tensor]:
    present = [s for s in syms if s is not None]
    nbits = [rc.raw_bit_counts(s) for s in present]
    allbits = np.concatenate(nbits) if nbits else np.zeros(0, np.int64)
    offsets = rc.unpack_bits(sec["raw"], allbits)
    payloads = rc.VarintReader(sec["lossy"])
    out, start = [], 0
    for i, (s, (shape, dtype)) in enumerate(zip(syms, layout, strict=True)):
        r = None
        if s is not None:
            nbig = int((s >= rc._BIG0).sum())
            r = rc.symbols_to_residuals(s, offsets[start:start + nbig])
            start += nbig
        if p.along_positions:
            if r is None:
                raise BlobError("corrupt kv-delta header (coded)")
            out.append(rc.from_ordered(rc.undo_position_deltas(r, shape), dtype, shape))
            continue
        if mode is not None:
            n = payloads.read()
            if payloads.pos + n > len(payloads.data):
                raise BlobError("corrupt kv-delta blob (lossy payload)")
            payload = payloads.data[payloads.pos:payloads.pos + n]
            payloads.pos += n
            if r is None or mode.uses_symbols:
                out.append(mode.decode(r, pred[i], payload))
                continue
        if r is None:
            raise BlobError("corrupt kv-delta header (coded)")
        out.append(rc.from_ordered(rc.to_ordered(pred[i]) + r, dtype, shape))
    if mode is not None and payloads.pos != len(payloads.data):
        raise BlobError("corrupt kv-delta blob (trailing lossy payload)")
    return out


def inspect_delta_blob(blob: bytes) -> dict:
    """What a kv-delta blob holds, from its checked header and section sizes (no model)."""
    header, sec = parse(blob)
    layout = header.layout
    n, comps, raw_bits = header.tokens.n, header.components, header.raw_bits
    res_bits = header.residual_bits  # checked: the residual sections' size
    tok_bits = header.tokens.bits  # checked: the token section's size
    total = 8 * len(blob)
    return {
        "kind": KIND,
        "mode": header.mode,
        "max_abs_error": header.max_abs_error,
        "lossy": header.lossy,
        "predictor": header.predictor,
        "model": (header.model or {}).get("name"),
        "tokens": n,
        "components": comps,
        "layers": len(layout) // 2,
        "dtypes": sorted({dtype_name(d) for _, d in layout}),
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
            "coding": header.tokens.coding,
            "bits": tok_bits,
            "bits_per_component": tok_bits / comps if comps else 0.0,
            "bits_per_token": tok_bits / n if n else 0.0,
        },
        "bits_per_component": total / comps if comps else 0.0,
        "bits_per_token": total / n if n else 0.0,
        "ratio": raw_bits / total if total else None,
        "ratio_residual_only": raw_bits / res_bits if res_bits else None,
    }
