"""Lookup tables of the integer engine, built by exact integer and decimal arithmetic.

Every nonlinearity of the engine (softmax's exp, SiLU's and GELU's sigmoid, rotary cos/sin)
is a table lookup, and every table is computed here without the platform's libm: Python's
``decimal`` (one C implementation, bundled with CPython) for a few constants, then pure
integer recurrences. So every machine builds bit-identical tables, which is what makes the
engine's probabilities portable (float transcendental functions differ by ulps between CUDA
and CPU libraries).
"""

from __future__ import annotations

from decimal import Decimal, localcontext
from functools import cache, lru_cache

import numpy as np

_DIGITS = 50  # decimal digits for constants: far beyond the 30-60 bits the tables keep
_WORK = 80  # fixed-point bits of the integer recurrences

EXP_STEP = 12  # exp tables advance in steps of 2**-12 nat
ATTN_BITS = 16  # attention weights: exp(-d) in Q16
PROB_BITS = 30  # next-token weights: exp(-d) in Q30
SIGMOID_IN = 10  # sigmoid/GELU tables take x in Q10
SIGMOID_OUT = 16  # ... and give a Q16 factor
SIGMOID_RANGE = 16  # over [-16, 16); the factor is saturated beyond
ROPE_BITS = 14  # rotary cos/sin in Q14


def _exp_neg(x: Decimal) -> Decimal:
    with localcontext() as ctx:
        ctx.prec = _DIGITS
        return (-x).exp()


def _fixed(x: Decimal, bits: int) -> int:
    with localcontext() as ctx:
        ctx.prec = _DIGITS
        return int((x * (1 << bits)).to_integral_value())


def _geometric(ratio_bits: int, n: int, out_bits: int) -> list[int]:
    """round(2**out_bits * exp(-i / 2**ratio_bits)) for i < n, by an exact integer recurrence."""
    r = _fixed(_exp_neg(Decimal(1) / (1 << ratio_bits)), _WORK)
    v, out, drop = 1 << _WORK, [], _WORK - out_bits
    half = (1 << (drop - 1)) if drop > 0 else 0
    for _ in range(n):
        out.append((v + half) >> drop)
        v = (v * r) >> _WORK
    return out


@cache
def exp_table(out_bits: int) -> np.ndarray:
    """exp(-i * 2**-EXP_STEP) in Q(out_bits), int64, down to the last nonzero value, then a 0.

    Indices past the end are clamped onto the 0: weights too small to represent vanish.
    """
    # exp(-x) * 2**b >= 1/2 while x <= (b + 1) ln 2.
    n = int((out_bits + 1) * 0.6931471805599453 * (1 << EXP_STEP)) + 2
    values = [v for v in _geometric(EXP_STEP, n, out_bits) if v > 0]
    return np.array(values + [0], dtype=np.int64)


@cache
def sigmoid_table() -> np.ndarray:
    """sigmoid(i * 2**-SIGMOID_IN) in Q(SIGMOID_OUT) for i in [-16 * 2**10, 16 * 2**10)."""
    n = SIGMOID_RANGE << SIGMOID_IN
    e = _geometric(SIGMOID_IN, n + 1, _WORK)  # exp(-|x|) in Q80
    one, out_one = 1 << _WORK, 1 << SIGMOID_OUT
    pos = [(out_one * one * 2 + (one + v)) // (2 * (one + v)) for v in e]  # 1 / (1 + e)
    neg = [out_one - p for p in pos]  # e / (1 + e)
    return np.array(neg[n:0:-1] + pos[:n], dtype=np.int64)


@cache
def gelu_tanh_table() -> np.ndarray:
    """The factor of GELU's tanh form, gelu(x) = x * sigmoid(2 c (x + 0.044715 x^3)),
    c = sqrt(2 / pi), in Q(SIGMOID_OUT) over the same grid as ``sigmoid_table``."""
    n = SIGMOID_RANGE << SIGMOID_IN
    with localcontext() as ctx:
        ctx.prec = _DIGITS
        c2 = 2 * (Decimal(2) / _pi()).sqrt()
        k = Decimal("0.044715")
        out = []
        for i in range(-n, n):
            x = Decimal(i) / (1 << SIGMOID_IN)
            z = c2 * (x + k * x * x * x)
            out.append(_fixed(1 / (1 + _exp_neg(z)), SIGMOID_OUT))
    return np.array(out, dtype=np.int64)


def _pi() -> Decimal:
    """pi to the working precision (the decimal module documentation's series)."""
    with localcontext() as ctx:
        ctx.prec = _DIGITS + 2
        three = Decimal(3)
        lasts, t, s, n, na, d, da = 0, three, 3, 1, 0, 0, 24
        while s != lasts:
            lasts = s
            n, na = n + na, na + 8
            d, da = d + da, da + 32
            t = (t * n) / d
            s += t
    return +s


def _cos_sin(x: Decimal) -> tuple[Decimal, Decimal]:
    """Taylor series after reduction into [-pi, pi]."""
    with localcontext() as ctx:
        ctx.prec = _DIGITS + 10
        two_pi = 2 * _pi()
        x = x - two_pi * (x / two_pi).to_integral_value()
        cos, sin, term, k = Decimal(0), Decimal(0), Decimal(1), 0
        while True:
            if k % 4 == 0:
                cos += term
            elif k % 4 == 1:
                sin += term
            elif k % 4 == 2:
                cos -= term
            else:
                sin -= term
            k += 1
            term = term * x / k
            if abs(term) < Decimal(10) ** -(_DIGITS + 5) and k > 4:
                return cos, sin


@lru_cache(maxsize=8)
def rope_table(theta: float, head_dim: int, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of p * theta**(-2i/d) in Q(ROPE_BITS), [n_positions, head_dim // 2] int64.

    Angles are composed from the binary digits of p by exact integer rotations in Q30, so
    the table costs one decimal cos/sin per (frequency, bit), not per position.
    """
    half = head_dim // 2
    bits = max(1, int(n_positions - 1).bit_length())
    q = 30
    base = np.zeros((bits, half, 2), dtype=np.int64)
    with localcontext() as ctx:
        ctx.prec = _DIGITS
        for i in range(half):
            omega = Decimal(repr(float(theta))) ** (Decimal(-2 * i) / Decimal(head_dim))
            for j in range(bits):
                c, s = _cos_sin(omega * (1 << j))
                base[j, i] = (_fixed(c, q), _fixed(s, q))
    pos = np.arange(n_positions, dtype=np.int64)[:, None]
    cos = np.full((n_positions, half), 1 << q, dtype=np.int64)
    sin = np.zeros((n_positions, half), dtype=np.int64)
    rnd = 1 << (q - 1)
    for j in range(bits):
        on = ((pos >> j) & 1).astype(bool)
        cj, sj = base[j, :, 0][None], base[j, :, 1][None]
        c2 = (cos * cj - sin * sj + rnd) >> q
        s2 = (cos * sj + sin * cj + rnd) >> q
        cos, sin = np.where(on, c2, cos), np.where(on, s2, sin)
    shift = q - ROPE_BITS
    return (cos + (1 << (shift - 1))) >> shift, (sin + (1 << (shift - 1))) >> shift
