"""`seqkv kv-dump | kv-compress | kv-restore`: the delta tier for exported KV cache files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..core.blob import read_blob, read_file, write_atomic
from ..core.errors import SeqkvError
from .common import (
    BlobIn,
    CacheIn,
    Command,
    ModelOption,
    OutPath,
    TextIn,
    blob_info,
    check_engine,
    check_output,
    friendly_errors,
    load,
    read_text,
    warn_if_slow,
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no time estimate or summary")]
TOKEN_CODINGS = ("coded", "raw")


def _warn_tokens(what: str, n_tokens: int, chunk_size: int, batch: int) -> None:
    warn_if_slow(what, n_tokens, chunk_size, batch, "cpu",
                 "--tokens raw stores them uncoded (4 bytes each) and needs no coding pass"
                 if what == "coding" else "the tokens were coded under the model")


@friendly_errors
def kv_dump(
    input: TextIn,
    output: OutPath,
    dtype: Annotated[str, typer.Option(help="stored dtype: bf16, fp16 or fp32")] = "bf16",
    model: ModelOption = None,
) -> None:
    """Prefill a UTF-8 text and export its KV cache as a safetensors cache file."""
    import torch

    from ..core.cache import KVCache, dtype_alias, prefill_cache, save_cachefile
    from ..core.textcodec import encode_text

    stored = getattr(torch, dtype_alias(dtype, "--dtype"))
    text = read_text(input, allow_empty=False)
    check_output(output)
    lm = load(model)
    ids, _ = encode_text(lm.tokenizer, text)
    restored = prefill_cache(lm.model, ids)
    save_cachefile(output, KVCache.from_dynamic(restored.cache, ids, stored))


@friendly_errors
def kv_compress(
    input: CacheIn,
    output: OutPath,
    exact: Annotated[
        bool, typer.Option("--exact", help="lossless, bit for bit (the default without "
                           "--max-abs-error or --rel-mse; refuses them)")
    ] = False,
    max_abs_error: Annotated[
        float | None, typer.Option("--max-abs-error", help="lossy: bound on |restored - original|")
    ] = None,
    rel_mse: Annotated[
        float | None,
        typer.Option("--rel-mse", help="lossy: per-tensor bound on ||restored - original||^2 / "
                     "||original||^2 (residuals through TurboQuant-mse)"),
    ] = None,
    predictor: Annotated[
        str, typer.Option(help="recompute (the model's prefill), none (plain entropy coding), "
                          "neighbour (previous position) or quantized (a per-vector copy)")
    ] = "recompute",
    tokens: Annotated[str, typer.Option(help="coded (under the model) or raw")] = "coded",
    predictor_dtype: Annotated[
        str | None, typer.Option(help="recompute in bf16, fp16 or fp32; default: the model's")
    ] = None,
    predictor_attn: Annotated[
        str | None, typer.Option(help="recompute with eager or sdpa attention; default: seqkv's "
                                 "repeatable choice (eager on GPUs)")
    ] = None,
    copy_quantizer: Annotated[
        str, typer.Option(help="quantized predictor: the method (int8, fp8, turboquant-mse, ...)")
    ] = "int8",
    copy_bits: Annotated[
        float | None, typer.Option(help="quantized predictor: bits per component")
    ] = None,
    model: ModelOption = None,
    quiet: Quiet = False,
) -> None:
    """Compress a KV cache file (safetensors) to a kv-delta blob."""
    if exact and (max_abs_error is not None or rel_mse is not None):
        raise SeqkvError("--exact excludes --max-abs-error and --rel-mse")
    if tokens not in TOKEN_CODINGS:
        raise SeqkvError(f"--tokens must be coded or raw, not {tokens!r}")
    data = read_file(input, "cache file")
    check_output(output)
    from ..core.cache import parse_cachefile
    from ..delta import compress_kv, needs_model, predictor_from_options
    from ..tokens.codec import DEFAULT_BATCH, DEFAULT_CHUNK

    kv = parse_cachefile(data, str(input))
    p = predictor_from_options(predictor, dtype=predictor_dtype, attn=predictor_attn,
                               method=copy_quantizer, bits=copy_bits)
    if tokens == "coded" and not quiet:
        _warn_tokens("coding", kv.n_tokens, DEFAULT_CHUNK, DEFAULT_BATCH)
    lm = load(model) if needs_model(p, tokens) else None
    blob = compress_kv(kv, lm, p, max_abs_error=max_abs_error, rel_mse=rel_mse, tokens=tokens)
    write_atomic(output, blob)
    if not quiet:
        typer.echo(_summary(blob), err=True)


@friendly_errors
def kv_restore(
    input: BlobIn,
    output: OutPath,
    exact: Annotated[
        bool, typer.Option("--exact", help="refuse a lossy blob: every tensor bit for bit")
    ] = False,
    model: ModelOption = None,
) -> None:
    """Restore a kv-delta blob to a KV cache file (safetensors)."""
    blob = read_blob(input)
    check_output(output)
    info = blob_info(blob, input)  # refuse a bad blob before loading a model
    if info.get("kind") != "kv-delta":
        raise SeqkvError(f"{input} is not a kv-delta blob (a text's blob: use seqkv decompress)")
    from ..core.cache import save_cachefile
    from ..delta import decompress_kv, needs_model, parse, predictor_of

    header, sections = parse(blob)
    if exact and header.mode != "exact":
        raise SeqkvError(f"{input} is lossy ({header.lossy}); it cannot restore bit for bit")
    if header.tokens.coding == "coded":
        tokens = blob_info(sections["tokens"], input)
        check_engine(tokens, input)
        _warn_decode_tokens(tokens)
    needs = needs_model(predictor_of(header), header.tokens.coding)
    lm = load(model, info.get("model")) if needs else None
    save_cachefile(output, decompress_kv(blob, lm))


def _warn_decode_tokens(info: dict) -> None:
    try:
        chunks, chunk_size = int(info["chunks"]), int(info["chunk_size"])
        batch = int(info["numerics"].get("batch", 1))
        tokens = int(info["tokens"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return  # a header without these: no estimate
    _warn_tokens("decoding", tokens, chunk_size, min(batch, max(chunks, 1)))


def _summary(blob: bytes) -> str:
    """One line saying what each number counts: the token part's bits/token without the
    inner blob's header, its bytes with it."""
    from ..delta import inspect_delta_blob, parse

    info = inspect_delta_blob(blob)
    n, r, t = info["tokens"], info["residual"], info["tokens_part"]
    line = (f"{n} tokens, {info['components']:,} components -> {info['bytes']:,} bytes, "
            f"{info['ratio']:.2f}x smaller than the cache's tensors; residuals "
            f"{r['bits_per_component']:.3f} bits/component ({r['bits'] // 8:,} bytes)")
    tok_bytes = t["bits"] // 8
    if t["coding"] == "coded" and tok_bytes:
        try:
            coded = blob_info(parse(blob)[1]["tokens"], Path("tokens"))["bits_per_token"]
        except SeqkvError:
            return line + f"; tokens {tok_bytes:,} bytes with their blob's header"
        return line + (f"; tokens coded at {coded:.2f} bits/token ({tok_bytes:,} bytes with "
                       "their blob's header)")
    if t["coding"] == "raw":
        return line + f"; tokens stored raw ({tok_bytes:,} bytes)"
    return line


def register(app: typer.Typer) -> None:
    app.command("kv-dump", cls=Command)(kv_dump)
    app.command("kv-compress", cls=Command)(kv_compress)
    app.command("kv-restore", cls=Command)(kv_restore)
