"""`seqkv compress | decompress | inspect | demo`: the token tier from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..core.blob import read_blob, write_atomic
from ..core.errors import SeqkvError
from .common import (
    WARN_AFTER_S,
    BlobIn,
    Command,
    ModelOption,
    OutPath,
    TextIn,
    blob_info,
    check_engine,
    check_output,
    coding_seconds,
    friendly_errors,
    load,
    print_json,
    read_text,
    warn_if_slow,
)

# seqkv.tokens.codec's DEFAULT_CHUNK and DEFAULT_BATCH, repeated so --help needs no torch
# (tests/test_cli_help.py checks that they agree).
DEFAULT_CHUNK = 2048
DEFAULT_BATCH = 16

ENCODE_ADVICE = ("faster: a GPU (from Python: seqkv.load_model(..., device=\"cuda\")), more "
                 "chunks coded at once (--batch), or shorter chunks so a short text runs as more "
                 "parallel streams (--chunk-size; each chunk restarts the context, a few bits "
                 "more)")


def _warn_encode(lm, text: str, chunk_size: int, batch: int) -> None:
    device = lm.device.type
    # A token is at least one byte (plus a few specials): skip tokenizing when even that
    # upper bound is quick.
    bound = len(text.encode("utf-8")) + 8
    if coding_seconds(bound, chunk_size, batch, device) <= WARN_AFTER_S:
        return
    tokens = len(lm.tokenizer(text).input_ids) if lm.tokenizer is not None else bound
    warn_if_slow("coding", tokens, chunk_size, batch, device, ENCODE_ADVICE)


def _warn_decode(info: dict) -> None:
    try:
        tokens, chunks = int(info["tokens"]), int(info["chunks"])
        chunk_size = int(info["chunk_size"])
        batch = int(info["numerics"].get("batch", 1))
    except (KeyError, TypeError, ValueError, AttributeError):
        return  # a header without these: no estimate
    warn_if_slow("decoding", tokens, chunk_size, min(batch, max(chunks, 1)), "cpu",
                 f"the blob's {chunks} chunk(s) of up to {chunk_size} tokens decode "
                 f"{batch} at a time, as they were coded (compress --chunk-size/--batch)")


@friendly_errors
def compress(
    input: TextIn,
    output: OutPath,
    model: ModelOption = None,
    chunk_size: Annotated[
        int, typer.Option(help="tokens per independently coded chunk")
    ] = DEFAULT_CHUNK,
    batch: Annotated[
        int, typer.Option(help="chunks coded in lockstep (parallel streams)")
    ] = DEFAULT_BATCH,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="no progress, time estimate or summary")
    ] = False,
) -> None:
    """Compress a UTF-8 text (and so its KV cache) to its tokens, coded under the model."""
    if chunk_size < 1 or batch < 1:
        raise SeqkvError("--chunk-size and --batch must be at least 1")
    text = read_text(input, allow_empty=False)
    check_output(output)
    lm = load(model)
    from ..tokens.api import compress_text

    if not quiet:
        _warn_encode(lm, text, chunk_size, batch)
    blob = compress_text(lm, text, chunk_size=chunk_size, batch=batch, progress=not quiet)
    write_atomic(output, blob)
    if not quiet:
        info = blob_info(blob, output)
        n, size = info["tokens"], len(blob)
        typer.echo(
            f"{n} tokens -> {size} bytes: the coded tokens take {info['bits_per_token']:.2f} "
            f"bits/token, the whole file {8 * size / n:.2f} bits/token with its header; "
            f"{info['fp16_kv_bits'] / (8 * size):,.0f}x smaller than the fp16 KV cache "
            f"({info['fp16_kv_bits'] // 8:,} bytes)",
            err=True,
        )


@friendly_errors
def decompress(
    input: BlobIn,
    output: OutPath,
    model: ModelOption = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="no progress or time estimate")
    ] = False,
) -> None:
    """Decompress a blob back to its text, byte for byte."""
    blob = read_blob(input)
    check_output(output)
    info = blob_info(blob, input)  # refuse a bad blob before loading a model
    if info.get("kind") == "kv-delta":
        raise SeqkvError(f"{input} is a kv-delta blob (a KV cache): use seqkv kv-restore")
    if info.get("text") is False:
        raise SeqkvError(f"{input} holds token ids, not text: restore the cache from Python")
    check_engine(info, input)
    if not quiet:
        _warn_decode(info)
    lm = load(model, info.get("model"))
    from ..tokens.api import decompress_text

    text = decompress_text(lm, blob, progress=not quiet)
    write_atomic(output, text.encode("utf-8"))


@friendly_errors
def inspect(
    input: BlobIn,
    json_: Annotated[bool, typer.Option("--json", help="print a JSON object")] = False,
) -> None:
    """Show what a blob holds (no model needed)."""
    info = blob_info(read_blob(input), input)
    if json_:
        print_json(info)
        return
    table = Table(show_header=False, box=None)
    for key, value in info.items():
        if not isinstance(value, dict):
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


@friendly_errors
def demo(
    model: ModelOption = None,
    texts: Annotated[
        list[Path] | None, typer.Option("--text", help="text files (default: the bundled ones)")
    ] = None,
    full: Annotated[
        bool, typer.Option("--full", help="the bundled texts whole (~300 tokens each, a few "
                           "minutes on a 2-core CPU), not their opening paragraphs")
    ] = False,
    threads: Annotated[
        int, typer.Option("--threads", help="CPU threads for torch: one decodes a single "
                          "stream fastest, by far when the machine is shared (BENCHMARKS.md)")
    ] = 1,
    json_: Annotated[bool, typer.Option("--json", help="print a JSON list")] = False,
) -> None:
    """Compress real texts, restore their KV caches, verify them, and compare sizes (about a
    minute on a 2-core CPU)."""
    console = Console(stderr=json_)
    console.width = max(console.width, 132)  # the table is wider than a default pipe's 80
    inputs = [(p.name, read_text(p, allow_empty=False)) for p in texts] if texts else None
    what = (f"{len(inputs)} text file(s)" if inputs else
            "the 3 bundled texts" + (" whole" if full else "' opening paragraphs (--full: whole)"))
    console.print(f"seqkv demo: {what}; each is compressed to its tokens, its KV cache restored "
                  "from them and checked. Loading the model ...")
    if threads < 1:
        raise SeqkvError("--threads must be at least 1")
    import torch

    from ..demo import BUNDLED, bundled_text, run_one

    torch.set_num_threads(threads)
    inputs = inputs or [(name, bundled_text(name, full)) for name in BUNDLED]
    lm = load(model)
    rows = []
    for name, text in inputs:
        console.print(f"[bold]{name}[/] ({len(text):,} characters)")
        rows.append(run_one(lm, name, text, progress=not json_))
        r = rows[-1]
        console.print(f"  {r.tokens} tokens -> {r.blob_bytes} bytes; compressed in "
                      f"{r.compress_s:.1f} s, restored in {r.restore_s:.1f} s; "
                      f"{'exact' if r.exact else 'NOT EXACT'}")
    if json_:
        print_json([r.to_dict() for r in rows])
    else:
        _demo_table(console, lm, rows)
    if not all(r.exact for r in rows):
        raise typer.Exit(1)


def _demo_table(console: Console, lm, rows: list) -> None:
    table = Table(title=f"seqkv demo: {lm.fingerprint.name}, token tier, {lm.device.type.upper()}")
    for col in ("text", "tokens", "bits/token", "blob B", "fp16 KV B", "TQ3 KV B",
                "vs fp16", "vs TQ3", "compress s", "restore s", "exact"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r.text, str(r.tokens), f"{r.bits_per_token:.2f}", str(r.blob_bytes),
                      f"{r.fp16_kv_bytes:,}", f"{r.turboquant3_kv_bytes:,}",
                      f"{r.ratio_vs_fp16:,.0f}x", f"{r.ratio_vs_turboquant3:,.0f}x",
                      f"{r.compress_s:.1f}", f"{r.restore_s:.1f}", "yes" if r.exact else "NO")
    console.print(table)
    console.print("exact = text byte for byte, cache bit for bit, greedy continuation token "
                  "for token. bits/token counts the coded stream; blob B includes the header.")


def register(app: typer.Typer) -> None:
    for command in (compress, decompress, inspect, demo):
        app.command(cls=Command)(command)
