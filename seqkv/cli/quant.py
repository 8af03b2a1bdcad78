"""`seqkv quantizers`: placeholder until the per-vector quantizers land."""

import typer


def register(app: typer.Typer) -> None:
    pass
