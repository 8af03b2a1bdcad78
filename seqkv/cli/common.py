"""What every CLI command shares: one-line errors, JSON output, the model option, and help
that renders flags as flags.

Nothing here imports torch, transformers or the codec: `seqkv --help` must stay fast, so the
heavy modules are imported inside the commands.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from ..blob import read_file
from ..errors import SeqkvError

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


def read_text(path: Path) -> str:
    data = read_file(path, "text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SeqkvError(f"{path} is not UTF-8 text (byte {e.start})") from e


def load(model: str | None):
    """The model a command runs under (imported late: --help stays fast)."""
    from ..models import load_model

    return load_model(model)


def fail(message: str, code: int = 1) -> None:
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
        except Exception as e:  # noqa: BLE001 - the last line of defence for users
            if os.environ.get("SEQKV_DEBUG"):
                raise
            fail(f"internal error ({type(e).__name__}): {e} (set SEQKV_DEBUG=1 for details)")

    return wrapper


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
