"""`seqkv quantizers`: distortion, inner-product bias and true stored bits of every quantizer."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .common import Command, friendly_errors, print_json

# (method, bits, extra constructor arguments) measured by `seqkv quantizers`.
CONFIGS: list[tuple[str, float, dict[str, Any]]] = [
    *[("turboquant-mse", b, {}) for b in (1, 2, 3, 4, 2.5, 3.5)],
    *[("turboquant-prod", b, {}) for b in (1, 2, 3, 4)],
    *[("kivi", b, {"axis": "token"}) for b in (2, 3, 4)],
    *[("kivi", b, {"axis": "channel"}) for b in (2, 4)],
    ("fp8", 8, {}),
    ("int8", 8, {}),
]


def measure(dim: int, n: int = 4096, seed: int = 0) -> list[dict[str, Any]]:
    """Each configuration on n random unit vectors (fixed seed): MSE, IP bias, stored bits."""
    import torch

    from ..core.errors import SeqkvError
    from ..quant import get_quantizer

    if dim < 2:
        raise SeqkvError(f"--dim must be at least 2, got {dim}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    x /= x.norm(dim=-1, keepdim=True)
    y = torch.randn(n, dim, generator=g)
    y /= y.norm(dim=-1, keepdim=True)
    true = (x * y).sum(-1).double()
    rows = []
    for method, bits, extra in CONFIGS:
        q = get_quantizer(method, bits, **extra)
        qt = q.quantize(x)
        xh = q.dequantize(qt).float()
        est = (xh * y).sum(-1).double()
        row = {
            "method": method,
            "bits": bits,
            "mse": float(((x - xh) ** 2).sum(-1).mean()),
            # least-squares slope of estimated on true inner products, minus 1
            "ip_bias": float((est * true).sum() / (true * true).sum()) - 1.0,
            "bits_per_component": qt.bits / qt.numel,
            "dim": dim,
            "vectors": n,
        }
        if method == "turboquant-mse" and float(bits) == int(bits):
            from ..quant import lloyd_max_codebook

            row["mse_optimum"] = lloyd_max_codebook(dim, int(bits)).vector_mse
        if q.name == "turboquant-outlier":
            row["outlier_channels"] = int(qt.params["outlier_channels"])
        if method == "kivi":
            row |= {"axis": extra["axis"], "group_size": q.group_size}
        rows.append(row)
    return rows


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
