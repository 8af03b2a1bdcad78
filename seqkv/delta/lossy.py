"""Lossy mode: residuals quantized uniformly so every restored value is within a bound.

q = round((x - pred) / 2E) and x' = cast(pred + 2E q). Casting to the stored dtype can add
up to half an ulp, and NaN/Inf have no residual; the encoder checks every value and stores
the few that break the bound (or are not finite) exactly, by index, as escapes.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import BlobError
from .cachefile import int_view
from .residual_coding import VarintReader

_QMAX = 1 << 40


def _recon(pred: torch.Tensor, q: np.ndarray, bound: float) -> torch.Tensor:
    step = torch.tensor(2.0 * bound, dtype=torch.float64)
    pf = pred.detach().cpu().to(torch.float64).reshape(-1)
    return (pf + torch.from_numpy(q).to(torch.float64) * step).to(pred.dtype)


def quantize_residual(x: torch.Tensor, pred: torch.Tensor, bound: float):
    """(integer residuals, (escape indices, escape bit patterns), the reconstruction)."""
    xf = x.detach().cpu().to(torch.float64).reshape(-1)
    pf = pred.detach().cpu().to(torch.float64).reshape(-1)
    qf = torch.round((xf - pf) / (2.0 * bound))
    ok = torch.isfinite(qf) & (qf.abs() < _QMAX)
    q = torch.where(ok, qf, torch.zeros_like(qf)).to(torch.int64).numpy()
    recon = _recon(pred, q, bound)
    err = (recon.to(torch.float64) - xf).abs()
    bad = ~(err <= bound)  # NaN error (x or recon not finite) is bad too
    q = np.where(bad.numpy(), 0, q)
    idx = torch.nonzero(bad).reshape(-1)
    flat_x = x.detach().cpu().reshape(-1)
    recon = _recon(pred, q, bound)
    recon[idx] = flat_x[idx]
    esc_bits = int_view(flat_x[idx]).numpy().tobytes()
    return q, (idx.numpy().astype(np.int64), esc_bits), recon.reshape(x.shape)


def dequantize_residual(
    q: np.ndarray, pred: torch.Tensor, bound: float, escapes: VarintReader
) -> torch.Tensor:
    recon = _recon(pred, q, bound)
    n = escapes.read()
    width = recon.element_size()
    end = escapes.pos + n * (8 + width)
    if end > len(escapes.data):
        raise BlobError("corrupt kv-delta blob (escapes)")
    idx = np.frombuffer(escapes.data[escapes.pos:escapes.pos + 8 * n], dtype="<i8")
    if n and (idx.min() < 0 or idx.max() >= recon.numel()):
        raise BlobError("corrupt kv-delta blob (escape index)")
    vals = escapes.data[escapes.pos + 8 * n:end]
    escapes.pos = end
    if n:
        iv = int_view(recon)
        iv[torch.from_numpy(idx.copy())] = torch.frombuffer(bytearray(vals), dtype=iv.dtype)
    return recon.reshape(pred.shape)
