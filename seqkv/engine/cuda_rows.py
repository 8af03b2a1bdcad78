"""Row kernels of the engine (Triton): the residual add, RMS norm and int8 split before a GEMM,
and the gated activation and split before the down projection, each one pass over its rows;
for one row (a one-stream decode step), either pass inside the GEMM after it
(``norm_linear_row``, ``act_linear_row``).

``norm_split`` gives model.residual_norm_split's integers and ``act_split`` model.activation_
split's. Compiled by inductor those ran 3-4x off memory bandwidth on the H200, bound by int64
arithmetic: above all rms_norm's int64 floor division per element, a long software routine on
GPUs. Here the divisor is per row, so each quotient is a float64 estimate (the numerator times
the row's reciprocal) made exact by an integer-valued correction; values that provably fit
in 32 bits are worked on in 32 bits; row maxima that only feed a float exponent are taken as
an OR of bits. The bounds that make each step exact are argued where it happens. On the H200
(SmolLM2's widths, CUDA graphs) that took 16,384 rows from 197-414 us to 51-111 us, and one
row from 3.6-5.7 us to 3.0-4.8 (benchmarks/dev/h200_bench_rows.py).

One program per row, the row in registers as two power-of-two parts so that no lane works on
padding (576 = 512 + 64); activation rows wider than ACT_ROW_BLOCK are read twice in blocks
(the maximum first, then the split, the activation computed again).

What "the same integers" covers: act_split, every int64 input. norm_split, every int64 input
except rows holding -2**63, where torch's aminmax with its int64 negation and max |x| differ
(the engine's rows stay far below: residual values are under 2**40 or so). Rows past 2**62,
norm gains beyond int32 and S < -16 take an exact replica of the torch arithmetic (int64
division, wraparound included) in a branch real rows never take.
"""

from __future__ import annotations

import torch

from . import tables
from .cuda_ops import launch_options
from .weights import FRAC, IntNorm

try:  # Triton ships with CUDA builds of torch; CPU machines never reach this module's kernels.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None

NORM_MAX_WIDTH = 8192  # a norm's row lives in one program's registers
ACT_ROW_BLOCK = 8192  # activation rows up to this width in registers; wider ones in blocks
ACT_LOOP_BLOCK = 4096  # the blocks of a wider row (a power of two)


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:
    from .cuda_ops import _await_inputs, _rescale, _weights_tile

    # rne(p) for |p| < 2**51: p + 1.5 * 2**52 lands in [2**52, 2**53), where float64's
    # spacing is 1, so the add rounds p to the nearest integer (ties to even); the sum's bits
    # minus this constant's bits are that integer (same exponent, the mantissas differ by it).
    _MAGIC = tl.constexpr(6755399441055744.0)
    _MAGIC_BITS = tl.constexpr(0x4338000000000000)

    @triton.jit
    def _row_shift(top, BITS: tl.constexpr):
        """max(frexp(float64(top)).exponent - BITS, 0) of a row's max |x| (0 for top = 0):
        read from the float's exponent field, so the int64 -> float64 rounding (which can
        carry top >= 2**53 to the next power of two) is torch's."""
        bits = top.to(tl.float64).to(tl.int64, bitcast=True)
        return tl.maximum(((bits >> 52) & 0x7FF) - (1022 + BITS), 0)

    @triton.jit
    def _halves(v, k):
        """split_rows' int8 halves of v at the row's shift k: q = rshift_round(v, k) in int64,
        then hi = (q + 64) >> 7 and lo = q - 128 hi in int32. The int8 casts keep only bits
        0..14 of q + 64 and q, which int32 arithmetic on q's low 32 bits gives alike (and
        |q| <= 2**13 anyway)."""
        q = ((v + ((1 << k) >> 1)) >> k).to(tl.int32)
        hi = (q + 64) >> 7
        return hi.to(tl.int8), (q - (hi << 7)).to(tl.int8)

    @triton.jit
    def _floordiv(a, b):
        """floor(a / b) for b > 0, whether // truncates (Triton on GPUs) or floors."""
        q = a // b
        return q - ((a - q * b) < 0).to(tl.int64)

    @triton.jit
    def _norm_den(total, n, k, S: tl.constexpr, EPS: tl.constexpr, EXACT_SQRT: tl.constexpr):
        """rms_norm's divisor before its doubling: r = max(isqrt(mean), 1), times 2**-S when
        S < 0, for the row's sum of squares ``total`` (int64 scalars throughout)."""
        mean = _floordiv(total, n) + (EPS >> tl.minimum(2 * k, 63))  # EPS >> 64+ is 0 in torch
        r = tl.sqrt(mean.to(tl.float64)).to(tl.int64)
        r = r - (r * r > mean).to(tl.int64)  # intops.isqrt, as torch runs it
        if EXACT_SQRT:  # and the floor whatever the sqrt's rounding (mean < 2**41 here)
            r = r + ((r + 1) * (r + 1) <= mean).to(tl.int64)
        r = tl.maximum(r, 1)
        if S < 0:
            r = r << (-S)
        return r

    @triton.jit
    def _div_fast(prod, den):
        """floor((prod + den) / (2 den)) for |prod| <= 2**51 and 1 <= den < 2**37.

        y = prod / D (D = 2 den) is estimated as p = prod * fl(1 / D): |y| <= 2**50 and two
        roundings of relative size <= 2**-53 (or a fused multiply-add's one) put p within
        2**50 * 2**-52 = 1/4 of y (within 5/8 even if the reciprocal were 4 ulps off). The
        target is floor(y + 1/2); q0 = rne(p) is within 1/2 + 1/4 of y, so within 1 of it:
        q0 is the floor, or one above or below. r = prod + den - q0 D is exact in float64: q0 D
        is an integer below |prod| + 2 D < 2**53 and each difference an integer below 2 D; one
        step towards 0 <= r < D fixes q0.
        """
        d = (den << 1).to(tl.float64)
        prod_f = prod.to(tl.float64)  # exact: |prod| <= 2**51
        t = prod_f * (1.0 / d) + _MAGIC
        q0 = t.to(tl.int64, bitcast=True) - _MAGIC_BITS
        r = (prod_f - (t - _MAGIC) * d) + den.to(tl.float64)
        # (Tighter: |p - y| <= |prod| 2**-52 / D ~ 1 / (2 D), and a y below a half-integer
        # lies >= 1 / D under it, so q0 is never above the floor: the step down, two
        # instructions, is there so that the argument needs only |p - y| < 1. The step up
        # is taken at ties, which rne may round down to even.)
        return q0 + (r >= d).to(tl.int64) - (r < 0.0).to(tl.int64)

    @triton.jit
    def _abs_top(a, b):
        """max |v| over a row held as two parts (0 in masked lanes); no -2**63 in the row."""
        return tl.maximum(tl.max(tl.abs(a), axis=0), tl.max(tl.abs(b), axis=0))

    @triton.jit
    def _or(a, b):
        return a | b

    @triton.jit
    def _abs_bits(a, b):
        """The OR of |v| over a row as two parts: its bit length is max |v|'s, so below 2**53
        (where int64 -> float64 is exact) it has max |v|'s float exponent, at two
        instructions a value fewer than the maximum."""
        return tl.reduce(tl.abs(a), 0, _or) | tl.reduce(tl.abs(b), 0, _or)

    @triton.jit
    def _fits_int32(v):
        """1 when every v is an int32 (its high word is its low word's sign), else 0."""
        return tl.min(((v >> 32).to(tl.int32) == (v.to(tl.int32) >> 31)).to(tl.int32), axis=0)

    @triton.jit
    def _square_sum(v32):
        return tl.sum(v32.to(tl.int64) * v32.to(tl.int64), axis=0)  # one widening multiply

    @triton.jit
    def _rms_norm(xa, xb, ga, gb, n, S: tl.constexpr, EPS: tl.constexpr):
        """model.rms_norm of one row held as two parts xa, xb (int64, 0 in masked lanes, as
        the gains ga, gb are): Q16 int64, in the same two parts, and split_rows' shift of
        the result (unused where the row is not split)."""
        top = _abs_bits(xa, xb)  # max(high, -low) of torch's aminmax, to the float exponent
        if top >= (1 << 53):  # the float64 rounding of max |x| can raise its exponent
            top = _abs_top(xa, xb)
        k = _row_shift(top, 20)
        half = (1 << k) >> 1
        xa = (xa + half) >> k  # rshift_round(x, k); masked lanes stay 0
        xb = (xb + half) >> k
        if S >= 0:
            ga, gb = ga << (S + 1), gb << (S + 1)
        else:
            ga, gb = ga << 1, gb << 1
        # The fast branch's bounds: top < 2**62 keeps x + 2**(k-1) from overflowing, so
        # |xs| <= 2**20 (|x| < 2**e for e = top's exponent, k = max(e - 20, 0)); gains that
        # are int32 make |xs gain2| <= 2**51; mean <= 2**40 + EPS < 2**41 makes r < 2**21,
        # and S >= -16 keeps den = r 2**-S below 2**37 (the wrapper checks EPS < 2**40).
        fits = tl.minimum(_fits_int32(ga), _fits_int32(gb))
        if (fits > 0) & (top < (1 << 62)) & (S >= -16):
            xa32, xb32 = xa.to(tl.int32), xb.to(tl.int32)
            den = _norm_den(_square_sum(xa32) + _square_sum(xb32), n, k, S, EPS, True)
            ya = _div_fast(xa32.to(tl.int64) * ga.to(tl.int32).to(tl.int64), den)
            yb = _div_fast(xb32.to(tl.int64) * gb.to(tl.int32).to(tl.int64), den)
            split = _row_shift(_abs_bits(ya, yb), 13)  # |y| <= 2**50 + 2
        else:  # torch's int64 arithmetic as it stands, wraparound and all
            den = _norm_den(tl.sum(xa * xa, axis=0) + tl.sum(xb * xb, axis=0), n, k, S, EPS,
                            False)
            ya = _floordiv(xa * ga + den, den << 1)
            yb = _floordiv(xb * gb + den, den << 1)
            split = _row_shift(_abs_top(ya, yb), 13)  # |y| <= 2**62: no -2**63
        return ya, yb, split

    @triton.jit
    def _store_split(ya, yb, k, ca, cb, vb, hi_ptr, lo_ptr, k_ptr, row, off):
        """split_rows of the row ya, yb at its shift k."""
        hi, lo = _halves(ya, k)
        tl.store(hi_ptr + off + ca, hi)
        tl.store(lo_ptr + off + ca, lo)
        hi, lo = _halves(yb, k)
        tl.store(hi_ptr + off + cb, hi, mask=vb)
        tl.store(lo_ptr + off + cb, lo, mask=vb)
        tl.store(k_ptr + row, k)

    # A row of n values is held as two parts, so that no lane works on padding where n is
    # not a power of two: columns [0, A) unmasked (A, a power of two, < n) and [A, A + B)
    # masked to n (B = next_power_of_2(n - A)): 576 = 512 + 64, 1536 = 1024 + 512.
    @triton.jit
    def _norm_split_kernel(h_ptr, delta_ptr, h2_ptr, post_gain_ptr, gain_ptr, hi_ptr, lo_ptr,
                           k_ptr, n, HAS_DELTA: tl.constexpr, HAS_POST: tl.constexpr,
                           S_POST: tl.constexpr, EPS_POST: tl.constexpr, S: tl.constexpr,
                           EPS: tl.constexpr, A: tl.constexpr, B: tl.constexpr, PDL: tl.constexpr):
        _await_inputs(PDL)
        row = tl.program_id(0).to(tl.int64)
        off = row * n
        ca = tl.arange(0, A)
        cb = A + tl.arange(0, B)
        vb = cb < n
        ya, yb, k = _residual_norm(h_ptr, delta_ptr, h2_ptr, post_gain_ptr, gain_ptr, off, ca,
                                   cb, vb, n, True, HAS_DELTA, HAS_POST, S_POST, EPS_POST, S,
                                   EPS)
        _store_split(ya, yb, k, ca, cb, vb, hi_ptr, lo_ptr, k_ptr, row, off)

    @triton.jit
    def _residual_norm(h_ptr, delta_ptr, h2_ptr, post_gain_ptr, gain_ptr, off, ca, cb, vb, n,
                       STORE, HAS_DELTA: tl.constexpr, HAS_POST: tl.constexpr,
                       S_POST: tl.constexpr, EPS_POST: tl.constexpr, S: tl.constexpr,
                       EPS: tl.constexpr):
        """model.residual_norm_split's row at off, as _rms_norm returns it: h' = h + delta
        (delta normed by the post gains where given), stored to h2 if STORE, then normed."""
        xa = tl.load(h_ptr + off + ca)
        xb = tl.load(h_ptr + off + cb, mask=vb, other=0)
        if HAS_DELTA:
            da = tl.load(delta_ptr + off + ca)
            db = tl.load(delta_ptr + off + cb, mask=vb, other=0)
            if HAS_POST:
                da, db, _ = _rms_norm(da, db, tl.load(post_gain_ptr + ca),
                                   tl.load(post_gain_ptr + cb, mask=vb, other=0), n, S_POST,
                                   EPS_POST)
            xa, xb = xa + da, xb + db
            tl.store(h2_ptr + off + ca, xa, mask=STORE)
            tl.store(h2_ptr + off + cb, xb, mask=vb & STORE)
        return _rms_norm(xa, xb, tl.load(gain_ptr + ca), tl.load(gain_ptr + cb, mask=vb, other=0),
                         n, S, EPS)

    @triton.jit
    def _gated(gu_ptr, base, cols, valid, width, table_ptr, ADD: tl.constexpr,
               LAST: tl.constexpr, SHIFT: tl.constexpr, OUT: tl.constexpr, Q: tl.constexpr):
        """model.gated_activation at columns cols of the row at base: act(gate) * up, in
        Q(Q) (Q16); valid: the columns' mask, or None."""
        if valid is None:  # int32 or int64 rows
            x = tl.load(gu_ptr + base + cols).to(tl.int64)
            u = tl.load(gu_ptr + base + width + cols).to(tl.int64)
        else:
            x = tl.load(gu_ptr + base + cols, mask=valid, other=0).to(tl.int64)
            u = tl.load(gu_ptr + base + width + cols, mask=valid, other=0).to(tl.int64)
        idx = tl.minimum(tl.maximum((x + ADD) >> SHIFT, 0), LAST)  # as torch: wraps alike
        f = tl.load(table_ptr + idx)
        xc = tl.minimum(tl.maximum(x, -(1 << 40)), 1 << 40)
        a = (xc * f + (1 << (OUT - 1))) >> OUT
        # Both factors are clamped to [-2**30, 2**30]: int32, and their product (<= 2**60) is
        # one widening multiply.
        a = tl.minimum(tl.maximum(a, -(1 << 30)), 1 << 30).to(tl.int32)
        u = tl.minimum(tl.maximum(u, -(1 << 30)), 1 << 30).to(tl.int32)
        return (a.to(tl.int64) * u.to(tl.int64) + (1 << (Q - 1))) >> Q

    @triton.jit
    def _act_split_kernel(gu_ptr, table_ptr, hi_ptr, lo_ptr, k_ptr, width, ADD: tl.constexpr,
                          LAST: tl.constexpr, SHIFT: tl.constexpr, OUT: tl.constexpr,
                          Q: tl.constexpr, A: tl.constexpr, B: tl.constexpr,
                          LOOP: tl.constexpr, PDL: tl.constexpr):
        _await_inputs(PDL)
        row = tl.program_id(0).to(tl.int64)
        base = row * 2 * width
        off = row * width
        if not LOOP:  # the row in registers, as two parts (above); |act| <= 2**44 < 2**53
            ca = tl.arange(0, A)
            cb = A + tl.arange(0, B)
            vb = cb < width
            ya = _gated(gu_ptr, base, ca, None, width, table_ptr, ADD, LAST, SHIFT, OUT, Q)
            yb = _gated(gu_ptr, base, cb, vb, width, table_ptr, ADD, LAST, SHIFT, OUT, Q)
            k = _row_shift(_abs_bits(ya, yb), 13)
            _store_split(ya, yb, k, ca, cb, vb, hi_ptr, lo_ptr, k_ptr, row, off)
        else:  # blocks of A: the row's maximum, then its split, the activation computed again
            cols = tl.arange(0, A)
            top = tl.zeros([A], tl.int64)
            for start in range(0, width, A):
                c = start + cols
                act = _gated(gu_ptr, base, c, c < width, width, table_ptr, ADD, LAST, SHIFT,
                             OUT, Q)
                top = tl.maximum(top, tl.maximum(act, -act))
            k = _row_shift(tl.max(top, axis=0), 13)
            for start in range(0, width, A):
                c = start + cols
                valid = c < width
                act = _gated(gu_ptr, base, c, valid, width, table_ptr, ADD, LAST, SHIFT, OUT, Q)
                hi, lo = _halves(act, k)
                tl.store(hi_ptr + off + c, hi, mask=valid)
                tl.store(lo_ptr + off + c, lo, mask=valid)
            tl.store(k_ptr + row, k)


    # -- one row: the pass and the GEMM after it in one kernel -----------------------------
    # A one-stream decode step is ~300 kernels of a few us each, bound by their launches and
    # first loads, not by their work. For one row, each program of the GEMM after a norm or
    # the activation computes that row pass itself (the row, a few KB, from L2) and keeps
    # its int8 halves in registers: the pass is no kernel of its own. Its weights (constants)
    # load before the wait for the previous kernel.
    @triton.jit
    def _row_weights(w_ptr, ca, cb, K, N, BN: tl.constexpr):
        """This program's BN columns of the int8 weights [N, K], as the row's two parts:
        [A, BN] and [B, BN] (0 past K and N)."""
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        ok = rn < N
        return rn, ok, _weights_tile(w_ptr, rn, ca, ok, K), _weights_tile(w_ptr, rn, cb, ok, K)

    @triton.jit
    def _row_linear(ya, yb, k, wa, wb, rn, ok, scale_ptr, bias_ptr, out_ptr,
                    HAS_BIAS: tl.constexpr):
        """cuda_ops.int8_linear of the row (ya, yb) at its split shift k: its int8 halves as
        row 0 of 16-row tiles (the MMA's least), the same two products, the same rescaling."""
        first = (tl.arange(0, 16) == 0)[:, None]
        hia, loa = _halves(ya, k)
        hib, lob = _halves(yb, k)
        ha = (tl.dot(tl.where(first, hia[None, :], 0).to(tl.int8), wa, out_dtype=tl.int32)
              + tl.dot(tl.where(first, hib[None, :], 0).to(tl.int8), wb, out_dtype=tl.int32))
        la = (tl.dot(tl.where(first, loa[None, :], 0).to(tl.int8), wa, out_dtype=tl.int32)
              + tl.dot(tl.where(first, lob[None, :], 0).to(tl.int8), wb, out_dtype=tl.int32))
        acc = tl.sum(ha.to(tl.int64) * 256 + la.to(tl.int64) * 2, axis=0)  # rows 1-15 are 0
        out = _rescale(acc, k, tl.load(scale_ptr + rn, mask=ok, other=0.0))
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=ok, other=0)
        tl.store(out_ptr + rn, out, mask=ok)

    @triton.jit
    def _norm_linear_kernel(h_ptr, delta_ptr, h2_ptr, post_gain_ptr, gain_ptr, w_ptr,
                            scale_ptr, bias_ptr, out_ptr, n, N, HAS_DELTA: tl.constexpr,
                            HAS_POST: tl.constexpr, S_POST: tl.constexpr,
                            EPS_POST: tl.constexpr, S: tl.constexpr, EPS: tl.constexpr,
                            HAS_BIAS: tl.constexpr, A: tl.constexpr, B: tl.constexpr,
                            BN: tl.constexpr, PDL: tl.constexpr):
        ca = tl.arange(0, A)
        cb = A + tl.arange(0, B)
        vb = cb < n
        rn, ok, wa, wb = _row_weights(w_ptr, ca, cb, n, N, BN)
        _await_inputs(PDL)
        ya, yb, k = _residual_norm(h_ptr, delta_ptr, h2_ptr, post_gain_ptr, gain_ptr, 0, ca,
                                   cb, vb, n, tl.program_id(0) == 0, HAS_DELTA, HAS_POST,
                                   S_POST, EPS_POST, S, EPS)
        _row_linear(ya, yb, k, wa, wb, rn, ok, scale_ptr, bias_ptr, out_ptr, HAS_BIAS)

    @triton.jit
    def _act_linear_kernel(gu_ptr, table_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, width, N,
                           ADD: tl.constexpr, LAST: tl.constexpr, SHIFT: tl.constexpr,
                           OUT: tl.constexpr, Q: tl.constexpr, HAS_BIAS: tl.constexpr,
                           A: tl.constexpr, B: tl.constexpr, BN: tl.constexpr,
                           PDL: tl.constexpr):
        ca = tl.arange(0, A)
        cb = A + tl.arange(0, B)
        vb = cb < width
        rn, ok, wa, wb = _row_weights(w_ptr, ca, cb, width, N, BN)
        _await_inputs(PDL)
        ya = _gated(gu_ptr, 0, ca, None, width, table_ptr, ADD, LAST, SHIFT, OUT, Q)
        yb = _gated(gu_ptr, 0, cb, vb, width, table_ptr, ADD, LAST, SHIFT, OUT, Q)
        _row_linear(ya, yb, _row_shift(_abs_bits(ya, yb), 13), wa, wb, rn, ok, scale_ptr,
                    bias_ptr, out_ptr, HAS_BIAS)


def _parts(n: int) -> tuple[int, int]:
    """(A, B): a row of n >= 2 values as an unmasked power of two A < n and a masked
    power of two B >= n - A."""
    if n < 2:
        raise ValueError(f"rows of {n} values: the row kernels take 2 or more")
    a = triton.next_power_of_2(n) // 2
    return a, triton.next_power_of_2(n - a)


def _warps(n: int) -> int:
    """Warps for rows (or blocks) of n values, 8 to 16 values a thread: 2 for SmolLM2's 576
    and 4 for its 1,536 (the fastest of 1 to 16 in a sweep on the H200 at 1,024 and 16,384
    rows)."""
    return max(1, min(16, triton.next_power_of_2(n) // 512))


def norm_in_range(norm: IntNorm) -> bool:
    """Whether the norm kernel's bounds cover this norm's constants (every norm the engine
    has derived so far; a model with others keeps the compiled torch functions)."""
    return -40 <= FRAC - norm.frac <= 40 and 0 <= norm.eps32 < 1 << 40


def _norm_args(norm: IntNorm) -> tuple[int, int]:
    """(S, EPS) constants of a norm's kernel, in the range the kernel's bounds assume."""
    if not norm_in_range(norm):
        raise ValueError(f"norm out of the kernel's range: frac {norm.frac}, eps32 {norm.eps32}")
    return FRAC - norm.frac, norm.eps32


def norm_split(h: torch.Tensor, delta: torch.Tensor | None, post: IntNorm | None,
               norm: IntNorm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """model.residual_norm_split(h, delta, post, norm) in one kernel: h' = h + delta (delta
    first normed by ``post`` where given), and split_rows(rms_norm(h', norm)) over its rows.
    h, delta: int64 Q16 [..., hidden]. Returns (h' shaped as h, h itself when delta is None;
    hi, lo int8 [rows, hidden]; k int64 [rows, 1])."""
    hidden = h.shape[-1]
    if hidden > NORM_MAX_WIDTH:
        raise ValueError(f"rows of {hidden} are wider than the norm kernel's {NORM_MAX_WIDTH}")
    rows = h.reshape(-1, hidden).contiguous()
    m, dev = rows.shape[0], h.device
    hi = torch.empty((m, hidden), dtype=torch.int8, device=dev)
    lo = torch.empty((m, hidden), dtype=torch.int8, device=dev)
    k = torch.empty((m, 1), dtype=torch.int64, device=dev)
    d, h2, post_gain, constants = _residual_args(rows, delta, post, norm)
    a, b = _parts(hidden)
    if m:
        _norm_split_kernel[(m,)](
            rows, d, h2, post_gain, norm.gain, hi, lo, k, hidden, A=a, B=b,
            num_warps=_warps(hidden), **constants, **launch_options(dev, m))
    return (h2.view(h.shape) if delta is not None else h), hi, lo, k


def _residual_args(rows: torch.Tensor, delta: torch.Tensor | None, post: IntNorm | None,
                   norm: IntNorm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """What the residual-norm kernels (_residual_norm) take for rows [M, hidden]: the delta
    rows (rows themselves where none), where h' goes (rows where no delta changes them), the
    post norm's gains (unread without one) and the kernels' constants."""
    s, eps = _norm_args(norm)
    post = post if delta is not None else None  # add_residual: no delta, nothing to norm
    s_post, eps_post = _norm_args(post) if post is not None else (0, 0)
    d = delta.reshape(rows.shape).contiguous() if delta is not None else rows
    h2 = torch.empty_like(rows) if delta is not None else rows
    return d, h2, (post if post is not None else norm).gain, dict(
        HAS_DELTA=delta is not None, HAS_POST=post is not None, S_POST=s_post,
        EPS_POST=eps_post, S=s, EPS=eps)


def act_split(table: torch.Tensor, gate_up: torch.Tensor, *,
              block: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """model.activation_split(table, gate_up) in one kernel: the factor table (int64 [2n],
    sigmoid or GELU) at the gate half of gate_up (int64 Q16 [..., 2 I]) times its up half,
    split as split_rows: (hi, lo int8 [rows, I], k int64 [rows, 1]). ``block``: a power of
    two below I forces the two-pass loop over blocks of that many columns (for tests)."""
    width = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * width).contiguous()
    m, dev = rows.shape[0], gate_up.device
    hi = torch.empty((m, width), dtype=torch.int8, device=dev)
    lo = torch.empty((m, width), dtype=torch.int8, device=dev)
    k = torch.empty((m, 1), dtype=torch.int64, device=dev)
    loop = width > ACT_ROW_BLOCK or (block is not None and block < width)
    a, b = (block or ACT_LOOP_BLOCK, 1) if loop else _parts(width)
    if m:
        _act_split_kernel[(m,)](
            rows, table.contiguous(), hi, lo, k, width, A=a, B=b, LOOP=loop,
            num_warps=_warps(a if loop else width), **_act_constants(table),
            **launch_options(dev, m))
    return hi, lo, k


# One-row kernels (norm_linear_row, act_linear_row): rows up to this wide, in registers with
# the program's [K, ROW_COLUMNS] weights; columns per program.
ROW_LINEAR_MAX_K = 2048
ROW_COLUMNS = 32


def _row_parts(n: int) -> tuple[int, int]:
    """_parts for a row that is also an int8 MMA operand, whose depth is at least 32: the
    second part padded to 32 (the first is 32 or more where row_linear_fits)."""
    a, b = _parts(n)
    return a, max(b, 32)


def row_linear_fits(k: int) -> bool:
    """Whether rows of k values take the one-row kernels."""
    return 64 <= k <= ROW_LINEAR_MAX_K


def norm_linear_row(h: torch.Tensor, delta: torch.Tensor | None, post: IntNorm | None,
                    norm: IntNorm, w: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """norm_split and cuda_ops.int8_linear of one row in one kernel: (h' shaped as h, the Q16
    outputs [1, N] of w [N, K]). The same integers."""
    hidden, n = h.shape[-1], w.shape[0]
    if h.numel() != hidden or not row_linear_fits(hidden):
        raise ValueError(f"norm_linear_row takes one row of 64-{ROW_LINEAR_MAX_K} values")
    row = h.reshape(1, hidden).contiguous()
    d, h2, post_gain, constants = _residual_args(row, delta, post, norm)
    out = torch.empty((1, n), dtype=torch.int64, device=h.device)
    a, b = _row_parts(hidden)
    _norm_linear_kernel[(triton.cdiv(n, ROW_COLUMNS),)](
        row, d, h2, post_gain, norm.gain, w, scale, bias if bias is not None else scale, out,
        hidden, n, HAS_BIAS=bias is not None, A=a, B=b, BN=ROW_COLUMNS, num_warps=4,
        **constants, **launch_options(h.device, 1))
    return (h2.view(h.shape) if delta is not None else h), out


def act_linear_row(table: torch.Tensor, gate_up: torch.Tensor, w: torch.Tensor,
                   scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """act_split and cuda_ops.int8_linear of one row in one kernel: the Q16 outputs [1, N] of
    w [N, I] for one [gate | up] row (int64 [..., 2 I]). The same integers."""
    width, n = gate_up.shape[-1] // 2, w.shape[0]
    if gate_up.numel() != 2 * width or not row_linear_fits(width):
        raise ValueError(f"act_linear_row takes one row of 64-{ROW_LINEAR_MAX_K} values")
    out = torch.empty((1, n), dtype=torch.int64, device=gate_up.device)
    a, b = _row_parts(width)
    _act_linear_kernel[(triton.cdiv(n, ROW_COLUMNS),)](
        gate_up.contiguous(), table.contiguous(), w, scale, bias if bias is not None else scale,
        out, width, n, HAS_BIAS=bias is not None, A=a, B=b, BN=ROW_COLUMNS, num_warps=4,
        **_act_constants(table), **launch_options(gate_up.device, 1))
    return out


def _act_constants(table: torch.Tensor) -> dict:
    """The gated activation's constants (model._table_lookup's index: rshift_round(x, shift)
    + n into the factor table of 2 n entries, and the output shifts)."""
    n = table.shape[0] // 2
    shift = FRAC - tables.SIGMOID_IN
    return dict(ADD=(1 << (shift - 1)) + (n << shift), LAST=2 * n - 1, SHIFT=shift,
                OUT=tables.SIGMOID_OUT, Q=FRAC)
