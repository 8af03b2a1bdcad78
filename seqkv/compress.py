"""The token tier: a KV cache stored as its token ids, coded under the model itself.

The cache of a causal LM is a deterministic function of its token prefix, so it carries at
most H(token_{i+1} | token_{<=i}) bits per position (arXiv 2604.15356, §3). A blob holds the
coded tokens; restoring the cache is decoding them and re-running prefill.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from . import __version__
from .blob import pack, unpack
from .errors import BlobError, ModelMismatchError, SeqkvError
from .kvsize import fp16_kv_bits, turboquant_kv_bits
from .models import LoadedModel
from .stepper import PROCEDURE, cache_kwarg
from .textcodec import TextRecipe, decode_text, encode_text
from .token_codec import DEFAULT_BATCH, DEFAULT_CHUNK, CodedChunk, TokenCodec

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
        """From a container already unpacked (and so already checksum-verified)."""
        if header.get("kind") != KIND:
            raise BlobError(f"not a token blob (kind {header.get('kind')!r})")
        try:
            lengths = [int(n) for n in header["chunks"]]
            if len(lengths) != len(sections) or sum(lengths) != int(header["tokens"]):
                raise BlobError("corrupt blob (chunk table)")
            chunks = [
                CodedChunk(n, np.frombuffer(s, dtype="<u4").astype(np.uint32))
                for n, s in zip(lengths, sections, strict=True)
            ]
            for key in ("model", "numerics", "token_hash"):
                header[key]  # noqa: B018 - presence check
        except (KeyError, TypeError, ValueError) as e:
            raise BlobError(f"corrupt blob header ({e})") from e
        return cls(header, chunks)

    @property
    def n_tokens(self) -> int:
        return int(self.header["tokens"])

    @property
    def bits(self) -> int:
        return sum(c.bits for c in self.chunks)


def compress_tokens(
    lm: LoadedModel,
    ids: Sequence[int] | torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    batch: int = DEFAULT_BATCH,
    procedure: str = PROCEDURE,
    coder: str | None = None,
    text: TextRecipe | None = None,
    progress: bool = False,
) -> bytes:
    """Token ids to a blob. ``coder``: "range" or "ans" (default: by the model's device)."""
    ids = _id_list(ids)
    codec = TokenCodec(lm, chunk_size, batch, procedure=procedure, coder=coder)
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


def compress_text(lm: LoadedModel, text: str, **options) -> bytes:
    """Text to a blob from which both the text (byte for byte) and its KV cache come back."""
    ids, recipe = encode_text(lm.tokenizer, text)
    return compress_tokens(lm, ids, text=recipe, **options)


def check_model(lm: LoadedModel, header: dict, tokenizer: bool = False) -> None:
    problem = lm.fingerprint.mismatch(header["model"], tokenizer=tokenizer)
    if problem:
        raise ModelMismatchError(problem)


def decompress_tokens(
    lm: LoadedModel, blob: bytes | TokenBlob, progress: bool = False
) -> list[int]:
    """A blob back to its token ids, verified against the stored hash."""
    parsed = blob if isinstance(blob, TokenBlob) else TokenBlob.parse(blob)
    check_model(lm, parsed.header)
    numerics = parsed.header["numerics"]
    codec = TokenCodec(
        lm, int(parsed.header["chunk_size"]), int(numerics.get("batch", 1)),
        procedure=str(numerics.get("procedure")), coder=str(parsed.header.get("coder")),
    )
    ids = codec.decode(parsed.chunks, numerics, progress=progress)
    if token_hash(ids) != parsed.header["token_hash"]:
        raise BlobError("decoded tokens do not match the stored hash (corrupt stream, or "
                        "this machine's numerics differ from the encoder's)")
    return ids


def decompress_text(lm: LoadedModel, blob: bytes, progress: bool = False) -> str:
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
    header, sections = unpack(blob)
    if header.get("kind") == "kv-delta":
        from .delta import inspect_delta_blob

        return inspect_delta_blob(blob)
    parsed = TokenBlob.from_parts(header, sections)
    h = parsed.header
    n, bits = parsed.n_tokens, parsed.bits
    return {
        "kind": h["kind"],
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
        "fp16_kv_bits": h["kv"]["fp16_bits"],
        "turboquant3_kv_bits": h["kv"]["turboquant3_bits"],
        "ratio_vs_fp16": h["kv"]["fp16_bits"] / bits if bits else None,
        "ratio_vs_turboquant3": h["kv"]["turboquant3_bits"] / bits if bits else None,
    }
