"""Lloyd-Max scalar codebooks for one coordinate of a uniform random point on the sphere.

TurboQuant (Zandieh et al., arXiv 2504.19874, Lemma 1) rotates a unit vector by a random
orthogonal matrix; each rotated coordinate then has the exact density

    f_d(x) = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2)) * (1 - x^2)^((d-3)/2),   x in [-1, 1],

and the MSE-optimal b-bit scalar quantizer for it is the Lloyd-Max quantizer of f_d. The
codebooks are computed here by numerical integration (no pasted tables, no scipy): the density
is tabulated on a fine midpoint grid, its cumulative moments are integrated once, and the
Lloyd iteration (boundaries = midpoints, centroids = conditional means) runs on those moments.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..core.errors import SeqkvError

# 2^20 midpoints on [-1, 1]: step 2e-6, a few thousand points per standard deviation even at
# d = 16384, so quadrature error is far below the 1% tolerance the codebooks are checked at.
_GRID = 1 << 20


@dataclass(frozen=True)
class Codebook:
    """Lloyd-Max codebook of f_d at ``bits`` bits: sorted centroids and the cell boundaries."""

    dim: int
    bits: int
    centroids: tuple[float, ...]
    boundaries: tuple[float, ...]  # len(centroids) - 1 interior boundaries
    coordinate_mse: float  # E[(x - Q(x))^2] for one coordinate under f_d

    @property
    def vector_mse(self) -> float:
        """Expected ||u - Q(u)||^2 for a unit vector u: d times the per-coordinate MSE."""
        return self.dim * self.coordinate_mse


@functools.lru_cache(maxsize=8)
def _moments(dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative integrals of f_d, x f_d and x^2 f_d at the grid edges (float64)."""
    h = 2.0 / _GRID
    x = -1.0 + (np.arange(_GRID, dtype=np.float64) + 0.5) * h
    # Log-space so (1 - x^2)^((d-3)/2) neither underflows for large d nor blows up for d = 2.
    logf = 0.5 * (dim - 3) * np.log1p(-x * x)
    w = np.exp(logf - logf.max())
    w /= w.sum()  # normalise numerically: exact mass 1 on the grid
    zero = np.zeros(1)
    edges = np.linspace(-1.0, 1.0, _GRID + 1)
    return (
        edges,
        np.concatenate([zero, np.cumsum(w)]),
        np.concatenate([zero, np.cumsum(w * x)]),
        np.concatenate([zero, np.cumsum(w * x * x)]),
    )


@functools.lru_cache(maxsize=256)
def lloyd_max_codebook(dim: int, bits: int, tol: float = 1e-12, max_iter: int = 20000) -> Codebook:
    """The Lloyd-Max codebook of f_dim with 2**bits levels (cached per (dim, bits))."""
    if dim < 2:
        raise SeqkvError(f"TurboQuant needs a vector dimension of at least 2, got {dim}")
    if not 1 <= bits <= 8:
        raise SeqkvError(f"codebook bits must be in 1..8, got {bits}")
    edges, F, M, Q = _moments(dim)
    levels = 1 << bits

    def cdf(t: np.ndarray, table: np.ndarray) -> np.ndarray:
        return np.interp(t, edges, table)

    # Start from equal-probability cells: already close, so Lloyd converges in few hundred steps.
    probs = np.arange(1, levels) / levels
    bounds = np.interp(probs, F, edges)
    cents = np.zeros(levels)
    for _ in range(max_iter):
        t = np.concatenate([[-1.0], bounds, [1.0]])
        mass = np.diff(cdf(t, F))
        first = np.diff(cdf(t, M))
        new = first / np.maximum(mass, 1e-300)
        converged = np.max(np.abs(new - cents)) < tol
        cents = new
        bounds = 0.5 * (cents[1:] + cents[:-1])
        if converged:
            break
    t = np.concatenate([[-1.0], bounds, [1.0]])
    mass, first, second = (np.diff(cdf(t, table)) for table in (F, M, Q))
    mse = float(np.sum(second - 2 * cents * first + cents * cents * mass))
    # Symmetrise: f_d is even, so the optimum is; this removes grid round-off asymmetry.
    cents = 0.5 * (cents - cents[::-1])
    bounds = 0.5 * (cents[1:] + cents[:-1])
    return Codebook(dim, bits, tuple(cents.tolist()), tuple(bounds.tolist()), mse)
