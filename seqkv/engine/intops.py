"""Integer primitives of the engine: exact on every device, at any batch and thread count.

Values are int64 fixed-point tensors. Reductions are integer sums and maxima (exact in any
order); products that need a GEMM run as int8 x int8 -> int32 (``torch._int_mm``) or as
float64 products of integers whose sums stay below 2**53, exact on any IEEE machine. No
float rounding ever reaches a result, so the CPU and any GPU compute the same integers.
"""

from __future__ import annotations

import torch

ACT_BITS = 13  # GEMM inputs are quantized per row to |x| <= 2**13 (int14), split into two int8


def bit_length(x: torch.Tensor) -> torch.Tensor:
    """Bits of |x| (0 for 0), exact for |x| < 2**53 (frexp reads the float's exponent)."""
    return torch.frexp(x.abs().to(torch.float64)).exponent.to(torch.int64)


def rshift_round(x: torch.Tensor, shift: torch.Tensor | int) -> torch.Tensor:
    """x * 2**-shift rounded half up; a negative shift multiplies."""
    if isinstance(shift, int):
        if shift > 0:
            return (x + (1 << (shift - 1))) >> shift
        return x << (-shift)
    right = shift.clamp(1, 62)
    rounded = (x + (torch.ones_like(right) << (right - 1))) >> right
    return torch.where(shift > 0, rounded, x << (-shift).clamp(0, 62))


def div_round(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den rounded half up, for den > 0."""
    return torch.div(2 * num + den, 2 * den, rounding_mode="floor")


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(n)) for 0 <= n < 2**52: a float64 estimate (IEEE sqrt is correctly rounded)
    made exact by integer correction."""
    r = torch.sqrt(n.to(torch.float64)).to(torch.int64)
    r = r - (r * r > n).to(torch.int64)
    return r + ((r + 1) * (r + 1) <= n).to(torch.int64)


def quantize_rows(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row dyadic quantization: v ~ q * 2**k with |q| <= 2**ACT_BITS; returns (q, k)."""
    k = (bit_length(v.abs().amax(dim=-1)) - ACT_BITS).clamp(min=0)
    return rshift_round(v, k.unsqueeze(-1)), k


def int_matmul(q: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """2 * q @ (A + B / 256), exactly, as float64 [M, N] holding integers, for int64 q with
    |q| <= 2**ACT_BITS and wt = [A | B], int8 [K, 2N] (weights and their rounding residuals).

    q = 128 hi + lo with int8 halves, stacked as one GEMM's rows so each weight is read once:
    2 q.A = 256 hi.A + 2 lo.A exactly, and the residual term is taken on hi alone
    (hi.B = 2 q.B / 256 up to lo's 0.8% of the row's range).
    """
    lo = ((q + 64) & 127) - 64
    hi = (q - lo) >> 7
    m, n = q.shape[0], wt.shape[1] // 2
    acc = _int8_gemm(torch.cat([hi, lo]).to(torch.int8), wt).to(torch.float64)
    return acc[:m, :n] * 256 + acc[m:, :n] * 2 + acc[:m, n:]


def _int8_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    k, n = b.shape
    if a.device.type == "cuda":
        if k % 8 or n % 8:
            return _f64_gemm(a, b)
        m = a.shape[0]
        if m <= 16:  # cuBLASLt's int8 path needs more than 16 rows
            a = torch.cat([a, a.new_zeros(17 - m, k)])
            return torch._int_mm(a, b)[:m]
        return torch._int_mm(a, b)
    return torch._int_mm(a, b)


def _f64_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Products of int8s summed over K < 2**30 stay far below 2**53: exact in float64.
    return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)
