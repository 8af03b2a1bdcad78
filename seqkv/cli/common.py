"""What every CLI command shares: one-line errors, JSON output, the model option."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ..blob import read_file
from ..errors import SeqkvError

ModelOption = Annotated[
    str | None,
    typer.Option("--model", "-m", help="smollm2-135m (default), gemma3-270m, or an HF model "
                 "directory or .gguf file"),
]

InPath = Annotated[Path, typer.Argument(help="input file")]
OutPath = Annotated[Path, typer.Option("--output", "-o", help="output file (written atomically)")]


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
