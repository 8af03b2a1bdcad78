"""The token tier: a KV cache stored as its token ids, coded under the model itself.

The cache of a causal LM is a deterministic function of its token prefix, so it carries at
most H(token_{i+1} | token_{<=i}) bits per position (arXiv 2604.15356, §3). A blob holds the
coded tokens; restoring the cache is decoding them and re-running prefill.

Two procedures give the coder its probabilities:
- the integer engine (seqkv.engine), for the architectures it maps (Llama, Qwen2/3, Mistral,
  Gemma-3): the same integers on every device, group size and thread count; compact blobs
  (compact.py);
- the HF lockstep procedure (stepper.py) for every other causal LM: exact only under the
  numerics recorded in its JSON blob (device, dtype, attention, group size, threads).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm
from transformers import DynamicCache

from ..core.blob import pack
from ..core.cache import RestoredCache, prefill_cache, token_hash
from ..core.errors import BlobError, ModelMismatchError, SeqkvError
from ..core.kvsize import fp16_kv_bits, turboquant_kv_bits
from ..core.models import LoadedModel
from ..core.packaged import model_name
from ..core.stepper import PROCEDURE
from ..core.textcodec import TextRecipe, decode_text, encode_text
from ..core.version import ENGINE_ID, __version__, engine_mismatch
from ..engine.model import MAX_POSITIONS
from . import compact
from .codec import DEFAULT_BATCH, DEFAULT_CHUNK, TokenCodec, split_chunks
from .json_blob import KIND, TokenBlob

ENGINE = "engine"
PROCEDURES = (ENGINE, PROCEDURE)

def _id_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    return [int(i) for i in (ids.reshape(-1).tolist() if torch.is_tensor(ids) else ids)]


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
    codec = lm.engine_codec()
    with tqdm(total=len(ids), desc="encode", unit="tok", disable=not progress) as bar:
        words = codec.encode(streams, progress=bar.update)
    if text is not None and text_digest is None:  # the text these ids and recipe give back
        text_digest = compact.text_hash(decode_text(lm.tokenizer, ids, text))
    header = compact.TokenHeader(
        engine=ENGINE_ID, model=engine.digest[:8], n_tokens=len(ids), chunk_size=chunk_size,
        words=[int(w.size) for w in words], token_hash=compact.ids_hash(ids),
        text=text, text_hash=text_digest if text is not None else None,
    )
    return compact.pack(header, words)


def compress_text(lm: LoadedModel, text: str, **options) -> bytes:
    """Text to a blob from which both the text (byte for byte) and its KV cache come back."""
    ids, recipe = encode_text(lm.tokenizer, text)
    return compress_tokens(lm, ids, text=recipe, text_digest=compact.text_hash(text),
                           **options)


def check_model(lm: LoadedModel, header: dict, tokenizer: bool = False) -> None:
    problem = lm.fingerprint.mismatch(header["model"], tokenizer=tokenizer)
    if problem:
        raise ModelMismatchError(problem)


def _engine_for_blob(lm: LoadedModel, header: compact.TokenHeader):
    problem = engine_mismatch(header.engine, "blob")
    if problem:
        raise BlobError(problem)
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


def _decompress_engine(lm: LoadedModel, header: compact.TokenHeader,
                       streams: list[np.ndarray], progress: bool) -> list[int]:
    engine = _engine_for_blob(lm, header)
    codec = lm.engine_codec()
    lengths = header.chunk_lengths
    group = decode_group_size(engine.device)
    ids: list[int] = []
    with tqdm(total=header.n_tokens, desc="decode", unit="tok", disable=not progress) as bar:
        for g in range(0, len(streams), group):
            for row in codec.decode(streams[g : g + group], lengths[g : g + group],
                                    progress=bar.update):
                ids.extend(row)
    if compact.ids_hash(ids) != header.token_hash:
        raise BlobError("decoded tokens do not match the stored hash (corrupt stream)")
    return ids


def decompress_tokens(
    lm: LoadedModel, blob: bytes | TokenBlob, progress: bool = False
) -> list[int]:
    """A blob back to its token ids, verified against the stored hash."""
    if isinstance(blob, bytes | bytearray) and compact.is_token_blob(blob):
        return _decompress_engine(lm, *compact.unpack(bytes(blob)), progress)
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


def _text_recipe(lm: LoadedModel, blob: bytes) -> tuple[TextRecipe, bytes | None]:
    """A text blob's recipe and text hash (compact blobs record one); refused where the blob
    holds bare token ids or the model has no tokenizer."""
    if compact.is_token_blob(blob):
        header, _ = compact.unpack(blob)
        recipe, digest = header.text, header.text_hash
    else:
        parsed = TokenBlob.parse(blob)
        text = parsed.header.get("text")
        recipe, digest = (TextRecipe.from_dict(text) if text is not None else None), None
        if recipe is not None:
            check_model(lm, parsed.header, tokenizer=True)
    if recipe is None:
        raise SeqkvError("this blob holds token ids, not text: restore the cache or ids instead")
    if lm.tokenizer is None:
        raise SeqkvError("this model has no tokenizer: cannot turn tokens back into text")
    return recipe, digest


def decompress_text(lm: LoadedModel, blob: bytes, progress: bool = False) -> str:
    """A blob back to its text, byte for byte."""
    _text_recipe(lm, blob)  # refused before any decoding
    return text_of(lm, blob, decompress_tokens(lm, blob, progress=progress))


def text_of(lm: LoadedModel, blob: bytes, ids: Sequence[int] | torch.Tensor) -> str:
    """The text a blob holds, from its ids decoded already (``restore_cache(...).input_ids``):
    one decode gives back both the cache and the text."""
    recipe, digest = _text_recipe(lm, blob)
    text = decode_text(lm.tokenizer, _id_list(ids), recipe)
    if digest is not None and compact.text_hash(text) != digest:
        raise ModelMismatchError("the tokens decoded exactly, but this tokenizer turns them "
                                 "into other text than was compressed (another tokenizer "
                                 "version?)")
    return text


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


def restore_cache(
    lm: LoadedModel, blob: bytes, target: torch.nn.Module | None = None, progress: bool = False
) -> RestoredCache:
    """Decode a blob's tokens with ``lm`` and prefill them on ``target`` (default: lm's model;
    pass e.g. a copy of the model on a GPU to restore the cache there)."""
    ids = decompress_tokens(lm, blob, progress=progress)
    return prefill_cache(target if target is not None else lm.model, ids)
