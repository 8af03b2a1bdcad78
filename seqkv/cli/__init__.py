"""The `seqkv` command. Each concept's commands live in their own module and register here.

Nothing imported here, or by the command modules at their top, may import torch,
transformers or the codec: `seqkv --help` stays fast (tests/test_cli_help.py)."""

from __future__ import annotations

import typer


def build_app() -> typer.Typer:
    from . import codec, kv, quant, store
    from .common import Group

    app = typer.Typer(
        name="seqkv",
        help="Compress transformer KV caches as sequences (arXiv 2604.15356).",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        cls=Group,
    )
    for module in (codec, quant, store, kv):
        module.register(app)
    return app


def main() -> None:
    build_app()()
