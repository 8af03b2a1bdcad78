"""What every CLI command shares: one-line errors, JSON output, the model option, the checks
that run before a model loads, and help that renders flags as flags.

Nothing here imports torch, transformers or the codec: `seqkv --help` must stay fast, so the
heavy modules are imported inside the commands, after the cheap checks.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from ..core.blob import read_file
from ..core.errors import SeqkvError

ModelOption = Annotated[
    str | None,
    typer.Option("--model", "-m", help="smollm2-135m (default), gemma3-270m, or an HF model "
                 "directory or .gguf file"),
]

TextIn = Annotated[Path, typer.Argument(metavar="INPUT", help="UTF-8 text file")]
BlobIn = Annotated[Path, typer.Argument(metavar="INPUT", help="blob file (.skv)")]
CacheIn = Annotated[Path, typer.Argument(metavar="INPUT", help="KV cache file (safetensors)")]
OutPath = Annotated[Path, typer.Option("--output", "-o", help="output file (written atomically)")]


# --- help rendering ------------------------------------------------------------------------

def _flags_take_no_value(params: list) -> None:
    # typer 0.29's rich help prints a type after every option, flags included
    # (`--quiet <bool>`, `--help <bool>`); an empty metavar prints none.
    for p in params:
        if isinstance(p, TyperOption) and getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""


class Command(TyperCommand):
    """A typer command whose help shows flags without a value and arguments as INPUT."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _flags_take_no_value(self.params)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            _flags_take_no_value([option])
        return option

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        # typer 0.29 writes a required argument as `{input}`; the usual form is INPUT / [INPUT].
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = (param.metavar or param.name or "").upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


class Group(TyperGroup):
    """The top-level `seqkv` group: its --help is a flag too."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            _flags_take_no_value([option])
        return option


# --- inputs and outputs, checked before any model loads --------------------------------------

def read_text(path: Path, allow_empty: bool = True) -> str:
    """A UTF-8 text file's text, or a one-line SeqkvError (missing, a directory, not UTF-8,
    empty unless allow_empty)."""
    data = read_file(path, "text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SeqkvError(f"{path} is not UTF-8 text (byte {e.start})") from e
    if not text and not allow_empty:
        raise SeqkvError(f"{path} is an empty text: nothing to compress")
    return text


def check_output(path: Path) -> None:
    """Refuse an output path that cannot be written: its folder is missing or not writable,
    or the path is a directory. Cheap, so commands run it before loading a model."""
    directory = path.parent
    if not directory.exists():
        raise SeqkvError(f"no such directory: {directory}")
    if not directory.is_dir():
        raise SeqkvError(f"not a directory: {directory}")
    if path.is_dir():
        raise SeqkvError(f"is a directory: {path}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise SeqkvError(f"cannot write to directory: {directory}")


def blob_info(blob: bytes, path: Path) -> dict:
    """seqkv.inspect_blob, with any failure as a one-line SeqkvError naming the file.

    Compact (engine) blobs are read without importing torch, so a refusal comes at once."""
    from ..blobs import inspect_blob

    try:
        return inspect_blob(blob)
    except SeqkvError as e:
        raise SeqkvError(f"{path}: {e}") from e
    except Exception as e:  # noqa: BLE001 - a header this version cannot read is bad input
        raise SeqkvError(f"{path}: unreadable blob header ({type(e).__name__}: {e})") from e


def check_engine(info: dict, path: Path) -> None:
    """Refuse, before loading a model, a compact blob coded by another engine version."""
    from ..core.version import engine_mismatch

    if info.get("format") != "compact":
        return
    problem = engine_mismatch(info.get("engine"), "blob")
    if problem:
        raise SeqkvError(f"{path}: {problem}")


def check_model_name(model: str | None, needed: str | None) -> None:
    """Refuse, before loading, a packaged model (or the default) other than the one a blob
    names in its header. A path is not checked here: its name is only known once loaded."""
    from ..core.packaged import DEFAULT_MODEL, NAMES

    requested = DEFAULT_MODEL if model in (None, "default") else str(model)
    if needed is None or requested not in NAMES or requested == needed:
        return
    hint = f"--model {needed}" if needed in NAMES else "--model and that model's path"
    raise SeqkvError(f"the blob was written with model {needed!r}, not {requested!r}: "
                     f"pass {hint}")


def load(model: str | None, needed: str | None = None):
    """The model a command runs under (imported late: --help stays fast). ``needed``: the
    model a blob's header names; a packaged model other than it is refused before loading."""
    check_model_name(model, needed)
    from ..core.models import load_model

    return load_model(model)


# --- what the work will cost ----------------------------------------------------------------

# Rough rates, measured with the current coder (README, BENCHMARKS.md): on the 2-core
# CPU one stream codes ~20 tokens/s, 6 streams ~65, 16 streams ~88 (about 20 * streams^0.55
# tokens/s); on the H200 the HF eager step, ~22 steps/s, sets the pace up to ~1,024 streams.
CPU_TOKENS_PER_S_ONE_STREAM = 20.0
CPU_STREAM_EXPONENT = 0.55
GPU_STEPS_PER_S = 22.0
WARN_AFTER_S = 60.0


def coding_seconds(tokens: int, chunk_size: int, batch: int, device: str = "cpu") -> float:
    """Estimated seconds to code (or decode) ``tokens`` in chunks of ``chunk_size``, ``batch``
    chunks in lockstep, on ``device`` ("cpu", "cuda", ...). An estimate, not a promise."""
    if tokens <= 0:
        return 0.0
    chunk_size, batch = max(chunk_size, 1), max(batch, 1)
    chunks = math.ceil(tokens / chunk_size)
    streams = min(batch, chunks)
    steps = math.ceil(chunks / batch) * min(chunk_size, tokens)  # each group: its longest chunk
    if device.startswith("cuda"):
        steps_per_s = GPU_STEPS_PER_S
    else:
        steps_per_s = CPU_TOKENS_PER_S_ONE_STREAM * streams ** CPU_STREAM_EXPONENT / streams
    return steps / steps_per_s


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def warn_if_slow(what: str, tokens: int, chunk_size: int, batch: int, device: str,
                 advice: str) -> float:
    """Print one line to stderr, before the work starts, when it will take over a minute."""
    seconds = coding_seconds(tokens, chunk_size, batch, device)
    if seconds > WARN_AFTER_S:
        where = "a GPU" if device.startswith("cuda") else "this CPU"
        typer.echo(f"seqkv: note: {what} {tokens:,} tokens on {where} will take about "
                   f"{_duration(seconds)} (a rough estimate); {advice}", err=True)
    return seconds


# --- the hot tiers' arguments (store rebalance, serve --tier-*), checked before any import ----

TIER_POLICIES = ("prior", "lru", "prior-guided")  # seqkv.store.policies.POLICIES' names


def parse_budget(text: str, option: str = "--budget") -> int:
    """A byte budget: a whole number of bytes, 0 or more (exit 2 with one line otherwise)."""
    value = text.strip().replace("_", "")
    if not value.isdigit():
        fail(f"bad {option} {text!r}: give a whole number of bytes, e.g. 67108864", 2)
    return int(value)


def check_policy(name: str, option: str = "--policy") -> str:
    """A tier policy's name (exit 2 with one line otherwise)."""
    if name not in TIER_POLICIES:
        fail(f"bad {option} {name!r}: give prior or lru", 2)
    return name


def parse_quant(spec: str, option: str = "--quant") -> tuple[str, float | None] | None:
    """A checkpoint quantizer METHOD[:BITS] of seqkv.quant (turboquant-mse:4, int8, fp8,
    kivi:2, ...) as (method, bits); "raw" (or "none"): None, the KV in the model's dtype.
    Built once here so that a bad one is refused (exit 2, one line) before any model loads."""
    method, _, bits_text = spec.strip().partition(":")
    if method in ("raw", "none") and not bits_text:
        return None
    try:
        bits = float(bits_text) if bits_text else None
    except ValueError:
        bits = float("nan")
    if bits is not None and not (math.isfinite(bits) and bits > 0):
        fail(f"bad {option} {spec!r}: the bits after ':' must be a positive number", 2)
    from ..quant import get_quantizer  # torch: only once the cheap checks passed

    try:
        get_quantizer(method, bits)
    except (SeqkvError, ValueError, TypeError) as e:
        fail(f"bad {option} {spec!r}: {e}", 2)
    return method, bits


def quant_spec(quant: tuple[str, float | None] | None) -> str | None:
    """(method, bits) back as METHOD[:BITS], for summaries."""
    if quant is None:
        return None
    method, bits = quant
    return method if bits is None else f"{method}:{bits:g}"


# --- errors and output ----------------------------------------------------------------------

def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line to stderr and exit non-zero."""
    typer.echo(f"seqkv: error: {message}", err=True)
    raise typer.Exit(code)


def friendly_errors(fn: Callable) -> Callable:
    """Turn expected failures into a one-line error and exit code 1, never a traceback.

    Set SEQKV_DEBUG=1 to see the traceback of an unexpected error.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except SeqkvError as e:
            fail(str(e))
        except OSError as e:
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            fail(f"{e.strerror or e}{where}")
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except MemoryError as e:  # e.g. the CPU kernels' scratch for a huge input
            fail(f"out of memory{': ' + str(e) if str(e) else ''}")
        except Exception as e:  # noqa: BLE001 - the last line of defence for users
            if os.environ.get("SEQKV_DEBUG"):
                raise
            fail(f"internal error ({type(e).__name__}): {e} (set SEQKV_DEBUG=1 for details)")

    return wrapper


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
