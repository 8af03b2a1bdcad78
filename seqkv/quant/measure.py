"""Every quantizer measured on random unit vectors: distortion, inner-product bias, true bits.

What `seqkv quantizers` prints: for each configuration in ``CONFIGS`` the MSE (beside the
Lloyd-Max optimum for TurboQuant-mse), the least-squares slope of estimated on true inner
products minus 1, and the bits per component the quantized tensor really stores.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.errors import SeqkvError
from . import get_quantizer, lloyd_max_codebook

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
            row["mse_optimum"] = lloyd_max_codebook(dim, int(bits)).vector_mse
        if q.name == "turboquant-outlier":
            row["outlier_channels"] = int(qt.params["outlier_channels"])
        if method == "kivi":
            row |= {"axis": extra["axis"], "group_size": q.group_size}
        rows.append(row)
    return rows
