"""`seqkv quantizers`: distortion, inner-product bias and true stored bits of every quantizer."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import Command, friendly_errors, print_json


def register(app: typer.Typer) -> None:
    @app.command("quantizers", cls=Command)
    @friendly_errors
    def quantizers(
        dim: Annotated[int, typer.Option("--dim", help="vector (head) dimension")] = 128,
        vectors: Annotated[int, typer.Option("--vectors", help="random unit vectors")] = 4096,
        seed: Annotated[int, typer.Option("--seed", help="seed of the random vectors")] = 0,
        json_out: Annotated[bool, typer.Option("--json", help="print a JSON list")] = False,
    ) -> None:
        """Distortion, inner-product bias and true stored bits per component of each quantizer."""
        from ..quant.measure import measure

        rows = measure(dim, vectors, seed)
        if json_out:
            print_json(rows)
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"Per-vector quantizers on {vectors} random unit vectors, d={dim}")
        for col in ("method", "bits", "MSE", "optimum", "IP bias", "stored bits/comp"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for r in rows:
            name = r["method"] + (f" ({r['axis']})" if "axis" in r else "")
            opt = f"{r['mse_optimum']:.5f}" if "mse_optimum" in r else ""
            table.add_row(
                name,
                f"{r['bits']:g}",
                f"{r['mse']:.5f}",
                opt,
                f"{r['ip_bias']:+.4f}",
                f"{r['bits_per_component']:.3f}",
            )
        Console().print(table)
