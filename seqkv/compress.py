"""The token tier: a KV cache stored as its token ids, coded under the model itself.

The cache of a causal LM is a deterministic function of its token prefix, so it carries at
most H(token_{i+1} | token_{<=i}) bits per position (arXiv 2604.15356, §3). A blob holds the
coded tokens; restoring the cache is decoding them and re-running prefill.

Two procedures give the coder its probabilities:
- the integer engine (seqkv.engine), for the architectures it maps (Llama, Qwen2/3, Mistral,
  Gemma-3): the same integers on every device, group size and thread count; compact blobs
  (token_blob.py);
- the HF lockstep procedure (stepper.py) for every other causal LM: exact only under the
  numerics recorded in its JSON blob (device, dtype, attention, group size, threads).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm
from transformers import DynamicCache

from . import __version__, token_blob
from .blob import pack, unpack
from .engine.codec import ENGINE_ID, EngineCodec
from .engine.model import MAX_POSITIONS
from .errors import BlobError, ModelMismatchError, SeqkvError
from .kvsize import fp16_kv_bits, turboquant_kv_bits
from .models import LoadedModel
from .packaged import model_name
from .stepper import PROCEDURE, cache_kwarg
from .textcodec import TextRecipe, decode_text, encode_text
from .token_codec import DEFAULT_BATCH, DEFAULT_CHUNK, CodedChunk, TokenCodec, split_chunks

ENGINE = "engine"
PROCEDURES = (ENGINE, PROCEDURE)

KIND = "tokens"


def _id_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    return [int(i) for i in (ids.reshape(-1).tolist() if torch.is_tensor(ids) else ids)]


def token_hash(ids: Sequence[int]) -> str:
    data = np.asarray(ids, dtype="<i8").tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class TokenBlob:
    """A parsed token blob: its header and coded chunks, not yet decoded."""

    header: dict
    chunks: list[CodedChunk]

    @classmethod
    def parse(cls, blob: bytes) -> TokenBlob:
        return cls.from_parts(*unpack(blob))

    @classmethod
    def from_parts(cls, header: dict, sections: list[bytes]) -> TokenBlob:
        """From a container already unpacked (and so already checksum-verified); every
        header field is checked against ``JSON_TOKEN_HEADER`` first."""
        if not isinstance(header, dict) or header.get("kind") != KIND:
            kind = header.get("kind") if isinstance(header, dict) else None
            raise BlobError(f"not a token blob (kind {kind!r})")
        check_json_header(header)
        lengths = header["chunks"]
        if (len(lengths) != len(sections) or sum(lengths) != header["tokens"]
                or max(lengths) > header["chunk_size"] or any(len(x) % 4 for x in sections)):
            raise BlobError("corrupt blob (chunk table)")
        chunks = [
            CodedChunk(n, np.frombuffer(s, dtype="<u4").astype(np.uint32))
            for n, s in zip(lengths, sections, strict=True)
        ]
        return cls(header, chunks)

    @property
    def n_tokens(self) -> int:
        return int(self.header["tokens"])

    @property
    def bits(self) -> int:
        return sum(c.bits for c in self.chunks)


def _is_int(x, low: int = 0) -> bool:
    return type(x) is int and x >= low


def _is_str(x) -> bool:
    return isinstance(x, str)


def _is_number(x) -> bool:
    return type(x) in (int, float) and math.isfinite(x) and x >= 0


def _is_recipe(x) -> bool:
    return x is None or (
        isinstance(x, dict) and set(x) <= {"head", "tail", "patch"}
        and _is_int(x.get("head", 0)) and _is_int(x.get("tail", 0))
        and isinstance(x.get("patch", []), list)
        and all(isinstance(p, list) and len(p) == 3 and _is_int(p[0]) and _is_int(p[1])
                and p[0] <= p[1] and _is_str(p[2]) for p in x.get("patch", [])))


# The JSON token header (the HF lockstep procedure's blobs): field -> check, all required
# except the optional ones. Read through check_json_header only.
JSON_TOKEN_HEADER = {
    "kind": lambda x: x == KIND,
    "tokens": lambda x: _is_int(x, 1),
    "chunk_size": lambda x: _is_int(x, 1),
    "coder": lambda x: x in ("range", "ans"),
    "chunks": lambda x: isinstance(x, list) and len(x) > 0 and all(_is_int(n, 1) for n in x),
    "token_hash": lambda x: _is_str(x) and len(x) == 32,
    "model": lambda x: isinstance(x, dict) and all(
        _is_str(x.get(k)) for k in ("name", "weights", "tokenizer", "dtype")),
    "numerics": lambda x: isinstance(x, dict) and all(
        _is_str(x.get(k)) for k in ("procedure", "device", "dtype", "attn"))
        and _is_int(x.get("batch"), 1) and ("threads" not in x or _is_int(x["threads"])),
}
_OPTIONAL = {
    "seqkv": _is_str,
    "torch": _is_str,
    "model_bits": lambda x: x is None or _is_number(x),
    "kv": lambda x: isinstance(x, dict) and _is_int(x.get("fp16_bits"))
        and _is_int(x.get("turboquant3_bits")),
    "text": _is_recipe,
    "sections": lambda x: isinstance(x, list),
}


def check_json_header(header: dict) -> None:
    """Refuse a JSON token header with any missing, unknown or ill-typed field."""
    for key, ok in JSON_TOKEN_HEADER.items():
        if key not in header or not ok(header[key]):
            raise BlobError(f"corrupt blob header (field {key!r})")
    for key, value in header.items():
        if key not in JSON_TOKEN_HEADER and (key not in _OPTIONAL or not _OPTIONAL[key](value)):
            raise BlobError(f"corrupt blob header (field {key!r})")
    text = header.get("text")
    if text is not None and text.get("head", 0) + text.get("tail", 0) > header["tokens"]:
        raise BlobError("corrupt blob header (field 'text')")


def _check_ids(lm: LoadedModel, ids: list[int]) -> None:
    if not ids:
        raise SeqkvError("nothing to encode: zero tokens")
    if min(ids) < 0 or max(ids) >= lm.vocab_size:
        raise SeqkvError(f"token id out of range for a vocabulary of {lm.vocab_size}")


def _engine(lm: LoadedModel, procedure: str | None):
    """The integer engine to code with, or None for the HF lockstep procedure."""
    if procedure not in (None, *PROCEDURES):
        raise SeqkvError(f"unknown coding procedure {procedure!r}; one of {PROCEDURES}")
    if procedure == PROCEDURE:
        return None
    engine = lm.engine()
    if engine is None and procedure == ENGINE:
        raise SeqkvError(f"the integer engine does not cover {lm.fingerprint.name!r}'s "
                         "architecture: use the lockstep procedure")
    return engine


def compress_tokens(
    lm: LoadedModel,
    ids: Sequence[int] | torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    batch: int = DEFAULT_BATCH,
    procedure: str | None = None,
    coder: str | None = None,
    text: TextRecipe | None = None,
    text_digest: bytes | None = None,
    progress: bool = False,
) -> bytes:
    """Token ids to a blob: under the integer engine where the architecture maps (default),
    else the HF lockstep procedure (``procedure`` forces one). ``batch`` and ``coder`` apply
    to the lockstep procedure only: the engine's blobs decode at any group size."""
    ids = _id_list(ids)
    _check_ids(lm, ids)
    if chunk_size < 1 or batch < 1:
        raise SeqkvError("chunk size and batch must be positive")
    engine = _engine(lm, procedure)
    if engine is not None:
        return _compress_engine(lm, engine, ids, chunk_size, text, text_digest, progress)
    codec = TokenCodec(lm, chunk_size, batch, procedure=PROCEDURE, coder=coder)
    coding = codec.encode(ids, progress=progress)
    header = {
        "kind": KIND,
        "seqkv": __version__,
        "torch": torch.__version__,
        "model": lm.fingerprint.to_dict(),
        "numerics": coding.profile.to_dict(),
        "tokens": len(ids),
        "chunk_size": coding.chunk_size,
        "coder": coding.coder,
        "chunks": [c.n_tokens for c in coding.chunks],
        "token_hash": token_hash(ids),
        "model_bits": coding.model_bits,
        "kv": {
            "fp16_bits": fp16_kv_bits(lm.config, len(ids)),
            "turboquant3_bits": turboquant_kv_bits(lm.config, len(ids), 3),
        },
        "text": text.to_dict() if text is not None else None,
    }
    return pack(header, [c.words.astype("<u4").tobytes() for c in coding.chunks])


def engine_chunk_size(lm: LoadedModel, chunk_size: int) -> int:
    """Chunks fit the context window (position 0 holds the prime token) and the engine."""
    max_pos = getattr(lm.config.get_text_config(), "max_position_embeddings", None) or chunk_size
    return max(1, min(chunk_size, int(max_pos) - 1, MAX_POSITIONS - 1))


def _compress_engine(lm, engine, ids, chunk_size, text, text_digest, progress) -> bytes:
    chunk_size = engine_chunk_size(lm, chunk_size)
    streams = [ids[a:b] for a, b in split_chunks(len(ids), chunk_size)]
    codec = EngineCodec(engine, lm.prime_token())
    with tqdm(total=len(ids), desc="encode", unit="tok", disable=not progress) as bar:
        words = codec.encode(streams, progress=bar.update)
    if text is not None and text_digest is None:  # the text these ids and recipe give back
        text_digest = token_blob.text_hash(decode_text(lm.tokenizer, ids, text))
    header = token_blob.TokenHeader(
        engine=ENGINE_ID, model=engine.digest[:8], n_tokens=len(ids), chunk_size=chunk_size,
        words=[int(w.size) for w in words], token_hash=token_blob.ids_hash(ids),
        text=text, text_hash=text_digest if text is not None else None,
    )
    return token_blob.pack(header, words)


def compress_text(lm: LoadedModel, text: str, **options) -> bytes:
    """Text to a blob from which both the text (byte for byte) and its KV cache come back."""
    ids, recipe = encode_text(lm.tokenizer, text)
    return compress_tokens(lm, ids, text=recipe, text_digest=token_blob.text_hash(text),
                           **options)


def check_model(lm: LoadedModel, header: dict, tokenizer: bool = False) -> None:
    problem = lm.fingerprint.mismatch(header["model"], tokenizer=tokenizer)
    if problem:
        raise ModelMismatchError(problem)


def _engine_for_blob(lm: LoadedModel, header: token_blob.TokenHeader):
    if header.engine != ENGINE_ID:
        raise BlobError(f"blob was coded by integer engine version {header.engine}; this "
                        f"seqkv has version {ENGINE_ID}")
    engine = lm.engine()
    if engine is None:
        raise ModelMismatchError(
            f"blob was coded under the integer engine with model {model_name(header.model)}; "
            f"{lm.fingerprint.name!r} has no integer mapping")
    if engine.digest[:8] != header.model:
        raise ModelMismatchError(
            f"blob was written with model {model_name(header.model)} (engine weights "
            f"{header.model.hex()}), not {lm.fingerprint.name!r} ({engine.digest[:8].hex()})")
    return engine


def decode_group_size(device: torch.device) -> int:
    """Chunks decoded in one lockstep group: any size decodes the same, so it is set for speed."""
    return 64 if device.type == "cpu" else 1024


def _decompress_engine(lm: LoadedModel, header: token_blob.TokenHeader,
                       streams: list[np.ndarray], progress: bool) -> list[int]:
    engine = _engine_for_blob(lm, header)
    codec = EngineCodec(engine, lm.prime_token())
    lengths = header.chunk_lengths
    group = decode_group_size(engine.device)
    ids: list[int] = []
    with tqdm(total=header.n_tokens, desc="decode", unit="tok", disable=not progress) as bar:
        for g in range(0, len(streams), group):
            for row in codec.decode(streams[g : g + group], lengths[g : g + group],
                                    progress=bar.update):
                ids.extend(row)
    if token_blob.ids_hash(ids) != header.token_hash:
        raise BlobError("decoded tokens do not match the stored hash (corrupt stream)")
    return ids


def decompress_tokens(
    lm: LoadedModel, blob: bytes | TokenBlob, progress: bool = False
) -> list[int]:
    """A blob back to its token ids, verified against the stored hash."""
    if isinstance(blob, bytes | bytearray) and token_blob.is_token_blob(blob):
        return _decompress_engine(lm, *token_blob.unpack(bytes(blob)), progress)
    parsed = blob if isinstance(blob, TokenBlob) else TokenBlob.parse(blob)
    check_model(lm, parsed.header)
    numerics = parsed.header["numerics"]
    codec = TokenCodec(
        lm, int(parsed.header["chunk_size"]), int(numerics.get("batch", 1)),
        procedure=str(numerics.get("procedure")), coder=str(parsed.header.get("coder")),
    )
    try:
        ids = codec.decode(parsed.chunks, numerics, progress=progress)
        if token_hash(ids) != parsed.header["token_hash"]:
            raise BlobError("decoded tokens do not match the stored hash (corrupt stream, or "
                            "this machine's numerics differ from the encoder's)")
    except BlobError as e:
        if "threads" not in numerics:
            raise BlobError(
                "this blob is in seqkv 0.1's token format (HF lockstep, CPU thread count not "
                "recorded) and does not decode here: decode it with the seqkv, machine and "
                "thread count that wrote it, then compress it again") from e
        raise
    return ids


def decompress_text(lm: LoadedModel, blob: bytes, progress: bool = False) -> str:
    if token_blob.is_token_blob(blob):
        header, streams = token_blob.unpack(blob)
        if header.text is None:
            raise SeqkvError("this blob holds token ids, not text: restore the cache or ids "
                             "instead")
        if lm.tokenizer is None:
            raise SeqkvError("this model has no tokenizer: cannot turn tokens back into text")
        ids = _decompress_engine(lm, header, streams, progress)
        text = decode_text(lm.tokenizer, ids, header.text)
        if token_blob.text_hash(text) != header.text_hash:
            raise ModelMismatchError("the tokens decoded exactly, but this tokenizer turns them "
                                     "into other text than was compressed (another tokenizer "
                                     "version?)")
        return text
    parsed = TokenBlob.parse(blob)
    if parsed.header.get("text") is None:
        raise SeqkvError("this blob holds token ids, not text: restore the cache or ids instead")
    check_model(lm, parsed.header, tokenizer=True)
    ids = decompress_tokens(lm, parsed, progress=progress)
    return decode_text(lm.tokenizer, ids, TextRecipe.from_dict(parsed.header["text"]))


def compress_cache(
    lm: LoadedModel, cache: DynamicCache, input_ids: Sequence[int] | torch.Tensor, **options
) -> bytes:
    """A DynamicCache and the token ids it was computed from, to a blob.

    The tensors themselves are not stored: they are a function of the tokens, recomputed on
    restore (``restore_cache``). The cache must hold exactly these tokens.
    """
    ids = _id_list(input_ids)
    if torch.is_tensor(input_ids) and input_ids.dim() == 2 and input_ids.shape[0] != 1:
        raise SeqkvError("compress_cache takes one sequence (batch size 1)")
    held = cache.get_seq_length()
    if held != len(ids):
        raise SeqkvError(f"the cache holds {held} positions but {len(ids)} token ids were given")
    return compress_tokens(lm, ids, **options)


@dataclass
class RestoredCache:
    """A cache rebuilt from a blob: the DynamicCache, its ids [1, T] and the next-token logits."""

    cache: DynamicCache
    input_ids: torch.Tensor
    next_logits: torch.Tensor


@torch.inference_mode()
def prefill_cache(model: torch.nn.Module, ids: Sequence[int]) -> RestoredCache:
    """The cache of ``ids`` by one prefill, as a serving engine would compute it."""
    device = next(model.parameters()).device
    input_ids = torch.as_tensor([list(ids)], dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1,
                **{cache_kwarg(model): cache})
    return RestoredCache(cache, input_ids, out.logits[:, -1])


def restore_cache(
    lm: LoadedModel, blob: bytes, target: torch.nn.Module | None = None, progress: bool = False
) -> RestoredCache:
    """Decode a blob's tokens with ``lm`` and prefill them on ``target`` (default: lm's model;
    pass e.g. a copy of the model on a GPU to restore the cache there)."""
    ids = decompress_tokens(lm, blob, progress=progress)
    return prefill_cache(target if target is not None else lm.model, ids)


def inspect_blob(blob: bytes) -> dict:
    """What a blob holds, read from its header alone (no model needed)."""
    if token_blob.is_token_blob(blob):
        return token_blob.describe(blob)
    header, sections = unpack(blob)
    if header.get("kind") == "kv-delta":
        from .delta import inspect_delta_blob

        return inspect_delta_blob(blob)
    parsed = TokenBlob.from_parts(header, sections)
    h = parsed.header
    kv = h.get("kv") or {}
    n, bits = parsed.n_tokens, parsed.bits
    return {
        "kind": h["kind"],
        "format": "json",
        "tokens": n,
        "bits": bits,
        "bytes": len(blob),
        "bits_per_token": bits / n if n else 0.0,
        "file_bits_per_token": 8 * len(blob) / n if n else 0.0,
        "model_bits": h.get("model_bits"),
        "coder_overhead": (bits / h["model_bits"] - 1) if h.get("model_bits") else None,
        "model": h["model"]["name"],
        "fingerprint": h["model"],
        "numerics": h["numerics"],
        "chunks": len(parsed.chunks),
        "chunk_size": h["chunk_size"],
        "coder": h.get("coder"),
        "text": h.get("text") is not None,
        "fp16_kv_bits": kv.get("fp16_bits"),
        "turboquant3_kv_bits": kv.get("turboquant3_bits"),
        "ratio_vs_fp16": kv["fp16_bits"] / bits if bits and kv else None,
        "ratio_vs_turboquant3": kv["turboquant3_bits"] / bits if bits and kv else None,
    }
