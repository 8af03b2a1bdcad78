"""Decode attention on the tensor cores, exactly: a design probe (dev; not in the package).

The engine's decode attention sums exact 64-bit products on the CUDA cores: 5.4 of 8.6 ms of
kernel time in a 1,024-stream step at positions 120-130 on the H200, bound by that arithmetic
(int64 products cost the same, reading each key once per key head was 2-4x slower:
benchmarks/results/engine_dev_h200.txt). This kernel computes the same integers with int8
MMAs summed exactly in int32:

- keys and values as three int8 digit planes of x - C, C = 32,896: three signed digits span
  exactly -8,421,504 .. 8,355,711, which is x - C for every |x| < 2**23 (balanced digits of x
  itself miss the top 32,896 values);
- queries (computed each step) as four balanced digits, the attention weights (0 .. 2**16)
  as three;
- q.k = sum_ab 256**(a+b) Q_a.K'_b + C sum_d q_d, and p.v = sum_ab 256**(a+b) P_a.V'_b +
  C sum_j p_j: each digit product an int8 MMA (|.| < 2**21), combined in int64.

One program per key/value head of a stream, its query heads the MMA's rows (padded to 16);
the table index, the weights' sum and the division are the engine's (``_finish_kernel``), so
the output is ``decode_attention``'s, integer for integer. What a shipped version would add:
the cache kept as digit planes (3 bytes a value, not 4), written by the rotation and prefill
kernels; sliding windows; the in-kernel rotation; a fourth digit where heads are narrower
than 64 (the engine's bound is 2**24 there).

Variants: _digit_kernel2 lets the MMAs accumulate p.v's digit products in int32 across the
keys (combined once) and combines q.k's in int32 pairs; _digit_kernel3 reads the engine's own
int32 cache and splits each block into digits in registers (no layout change), with sliding
windows.

    python3 benchmarks/dev/h200_digit_attention.py             # H200: exactness, then timing
    python3 benchmarks/dev/h200_digit_attention.py --once      # one call of each, for ncu
    TRITON_INTERPRET=1 python3 benchmarks/dev/h200_digit_attention.py --check   # CPU: exactness

Measured on the H200 on 2026-12-01 (benchmarks/results/engine_dev_h200.txt): exact, and no
faster than decode_attention at 1,024 streams (162-283 us a layer against 167-314); ncu shows
the probe bound by L1 traffic and register spills (128 registers, 25% occupancy), not by the
MMAs. Dropped.
"""

import sys
from functools import partial

import torch
import triton
import triton.language as tl

from seqkv.engine import cuda_attention
from seqkv.engine.intops import ACT_BITS
from seqkv.engine.model import FRAC, QKV_FRAC

C = 32_896
NEG = tl.constexpr(-(1 << 62))


@triton.jit
def _digit(x):
    """The balanced low int8 digit of int32 x, and what is left: (x - d) >> 8."""
    d = (x << 24) >> 24
    return d, (x - d) >> 8


@triton.jit
def _dots(a0, a1, a2, a3, b0, b1, b2):
    """sum_ab 256**(a+b) dot(A_a, B_b) in int64 for int8 tiles (A: 4 planes, a3 may be zeros
    when the caller has 3). Products of a + b = n summed in int32 first (at most 3 of them,
    each below 2**21)."""
    t0 = tl.dot(a0, b0, out_dtype=tl.int32)
    t1 = tl.dot(a0, b1, out_dtype=tl.int32) + tl.dot(a1, b0, out_dtype=tl.int32)
    t2 = (tl.dot(a0, b2, out_dtype=tl.int32) + tl.dot(a1, b1, out_dtype=tl.int32)
          + tl.dot(a2, b0, out_dtype=tl.int32))
    t3 = (tl.dot(a1, b2, out_dtype=tl.int32) + tl.dot(a2, b1, out_dtype=tl.int32)
          + tl.dot(a3, b0, out_dtype=tl.int32))
    t4 = tl.dot(a2, b2, out_dtype=tl.int32) + tl.dot(a3, b1, out_dtype=tl.int32)
    t5 = tl.dot(a3, b2, out_dtype=tl.int32)
    return (t0.to(tl.int64) + (t1.to(tl.int64) << 8) + (t2.to(tl.int64) << 16)
            + (t3.to(tl.int64) << 24) + (t4.to(tl.int64) << 32) + (t5.to(tl.int64) << 40))


@triton.jit
def _digit_kernel(q_ptr, kd_ptr, vd_ptr, pos_ptr, scores_ptr, table_ptr, scale_ptr, total_ptr,
                  acc_ptr, n_heads, rep, n_kv, capacity, plane, table_last, C: tl.constexpr,
                  D: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
    kvh = tl.program_id(0)  # b * n_kv + j
    b, j = kvh // n_kv, kvh % n_kv
    end = tl.load(pos_ptr + b) + 1
    r = tl.arange(0, R)
    d = tl.arange(0, D)
    s = tl.arange(0, BLOCK)
    r_ok = r < rep
    heads = (b * n_heads + j * rep + r).to(tl.int64)
    q = tl.load(q_ptr + heads[:, None] * D + d[None, :], mask=r_ok[:, None], other=0)
    q = q.to(tl.int32)
    q0, q_rest = _digit(q)
    q1, q_rest = _digit(q_rest)
    q2, q3 = _digit(q_rest)  # |left| <= 129 here: q3 in -1 .. 1
    q0, q1, q2, q3 = q0.to(tl.int8), q1.to(tl.int8), q2.to(tl.int8), q3.to(tl.int8)
    q_sum = tl.sum(q.to(tl.int64), axis=1)
    base = kvh.to(tl.int64) * capacity * D
    best = tl.full([R, BLOCK], NEG, tl.int64)
    for first in range(0, end, BLOCK):
        keys = first + s
        valid = keys < end
        at = base + keys[None, :] * D + d[:, None]  # [D, BLOCK]: the keys transposed
        k0 = tl.load(kd_ptr + at, mask=valid[None, :], other=0)
        k1 = tl.load(kd_ptr + plane + at, mask=valid[None, :], other=0)
        k2 = tl.load(kd_ptr + 2 * plane + at, mask=valid[None, :], other=0)
        scores = _dots(q0, q1, q2, q3, k0, k1, k2) + C * q_sum[:, None]
        tl.store(scores_ptr + heads[:, None] * capacity + keys[None, :], scores,
                 mask=r_ok[:, None] & valid[None, :])
        best = tl.maximum(best, tl.where(valid[None, :], scores, NEG))
    top = tl.max(best, axis=1)
    tl.debug_barrier()  # the scores, written by other threads of this program
    index_scale = tl.load(scale_ptr)
    total = tl.zeros([R], tl.int64)
    acc = tl.zeros([R, D], tl.int64)
    zero = tl.zeros([R, BLOCK], tl.int8)
    for first in range(0, end, BLOCK):
        keys = first + s
        valid = keys < end
        seen = r_ok[:, None] & valid[None, :]
        scores = tl.load(scores_ptr + heads[:, None] * capacity + keys[None, :], mask=seen,
                         other=0)
        idx = tl.minimum(tl.floor((top[:, None] - scores).to(tl.float64) * index_scale),
                         table_last)
        p = tl.load(table_ptr + idx.to(tl.int64), mask=seen, other=0)  # int32, 0 .. 2**16
        p0, p_rest = _digit(p)
        p1, p2 = _digit(p_rest)
        at = base + keys[:, None] * D + d[None, :]  # [BLOCK, D]
        v0 = tl.load(vd_ptr + at, mask=valid[:, None], other=0)
        v1 = tl.load(vd_ptr + plane + at, mask=valid[:, None], other=0)
        v2 = tl.load(vd_ptr + 2 * plane + at, mask=valid[:, None], other=0)
        acc += _dots(p0.to(tl.int8), p1.to(tl.int8), p2.to(tl.int8), zero, v0, v1, v2)
        total += tl.sum(p.to(tl.int64), axis=1)
    acc += C * total[:, None]
    tl.store(total_ptr + heads, total.to(tl.float64), mask=r_ok)
    tl.store(acc_ptr + heads[:, None] * D + d[None, :], acc.to(tl.float64), mask=r_ok[:, None])


@triton.jit
def _score_dots(a0, a1, a2, a3, b0, b1, b2):
    """_dots for q.k tiles (d <= 64), combined in int32 pairs first: t_n + (t_{n+1} << 8)
    stays below 2**30, so three int64 terms instead of six."""
    t0 = tl.dot(a0, b0, out_dtype=tl.int32)
    t1 = tl.dot(a0, b1, out_dtype=tl.int32) + tl.dot(a1, b0, out_dtype=tl.int32)
    t2 = (tl.dot(a0, b2, out_dtype=tl.int32) + tl.dot(a1, b1, out_dtype=tl.int32)
          + tl.dot(a2, b0, out_dtype=tl.int32))
    t3 = (tl.dot(a1, b2, out_dtype=tl.int32) + tl.dot(a2, b1, out_dtype=tl.int32)
          + tl.dot(a3, b0, out_dtype=tl.int32))
    t4 = tl.dot(a2, b2, out_dtype=tl.int32) + tl.dot(a3, b1, out_dtype=tl.int32)
    t5 = tl.dot(a3, b2, out_dtype=tl.int32)
    u0 = t0 + (t1 << 8)
    u1 = t2 + (t3 << 8)
    u2 = t4 + (t5 << 8)
    return u0.to(tl.int64) + (u1.to(tl.int64) << 16) + (u2.to(tl.int64) << 32)


@triton.jit
def _digit_kernel2(q_ptr, kd_ptr, vd_ptr, pos_ptr, scores_ptr, table_ptr, scale_ptr, total_ptr,
                   acc_ptr, n_heads, rep, n_kv, capacity, plane, table_last, C: tl.constexpr,
                   D: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
    """_digit_kernel with the p.v digit products accumulated in int32 by the MMAs themselves
    across the keys (each below 3 * 2**14 a key: exact up to 43,690 keys) and combined once."""
    kvh = tl.program_id(0)  # b * n_kv + j
    b, j = kvh // n_kv, kvh % n_kv
    end = tl.load(pos_ptr + b) + 1
    r = tl.arange(0, R)
    d = tl.arange(0, D)
    s = tl.arange(0, BLOCK)
    r_ok = r < rep
    heads = (b * n_heads + j * rep + r).to(tl.int64)
    q = tl.load(q_ptr + heads[:, None] * D + d[None, :], mask=r_ok[:, None], other=0)
    q = q.to(tl.int32)
    q0, q_rest = _digit(q)
    q1, q_rest = _digit(q_rest)
    q2, q3 = _digit(q_rest)
    q0, q1, q2, q3 = q0.to(tl.int8), q1.to(tl.int8), q2.to(tl.int8), q3.to(tl.int8)
    q_sum = tl.sum(q.to(tl.int64), axis=1)
    base = kvh.to(tl.int64) * capacity * D
    best = tl.full([R, BLOCK], NEG, tl.int64)
    for first in range(0, end, BLOCK):
        keys = first + s
        valid = keys < end
        at = base + keys[None, :] * D + d[:, None]
        k0 = tl.load(kd_ptr + at, mask=valid[None, :], other=0)
        k1 = tl.load(kd_ptr + plane + at, mask=valid[None, :], other=0)
        k2 = tl.load(kd_ptr + 2 * plane + at, mask=valid[None, :], other=0)
        scores = _score_dots(q0, q1, q2, q3, k0, k1, k2) + C * q_sum[:, None]
        tl.store(scores_ptr + heads[:, None] * capacity + keys[None, :], scores,
                 mask=r_ok[:, None] & valid[None, :])
        best = tl.maximum(best, tl.where(valid[None, :], scores, NEG))
    top = tl.max(best, axis=1)
    tl.debug_barrier()
    index_scale = tl.load(scale_ptr)
    total = tl.zeros([R], tl.int32)
    t0 = tl.zeros([R, D], tl.int32)
    t1 = tl.zeros([R, D], tl.int32)
    t2 = tl.zeros([R, D], tl.int32)
    t3 = tl.zeros([R, D], tl.int32)
    t4 = tl.zeros([R, D], tl.int32)
    for first in range(0, end, BLOCK):
        keys = first + s
        valid = keys < end
        seen = r_ok[:, None] & valid[None, :]
        scores = tl.load(scores_ptr + heads[:, None] * capacity + keys[None, :], mask=seen,
                         other=0)
        idx = tl.minimum(tl.floor((top[:, None] - scores).to(tl.float64) * index_scale),
                         table_last)
        p = tl.load(table_ptr + idx.to(tl.int64), mask=seen, other=0)  # 0 .. 2**16
        p0, p_rest = _digit(p)
        p1, p2 = _digit(p_rest)
        p0, p1, p2 = p0.to(tl.int8), p1.to(tl.int8), p2.to(tl.int8)
        at = base + keys[:, None] * D + d[None, :]
        v0 = tl.load(vd_ptr + at, mask=valid[:, None], other=0)
        v1 = tl.load(vd_ptr + plane + at, mask=valid[:, None], other=0)
        v2 = tl.load(vd_ptr + 2 * plane + at, mask=valid[:, None], other=0)
        t0 = tl.dot(p0, v0, t0, out_dtype=tl.int32)
        t1 = tl.dot(p0, v1, tl.dot(p1, v0, t1, out_dtype=tl.int32), out_dtype=tl.int32)
        t2 = tl.dot(p0, v2, tl.dot(p1, v1, tl.dot(p2, v0, t2, out_dtype=tl.int32),
                                   out_dtype=tl.int32), out_dtype=tl.int32)
        t3 = tl.dot(p1, v2, tl.dot(p2, v1, t3, out_dtype=tl.int32), out_dtype=tl.int32)
        t4 = tl.dot(p2, v2, t4, out_dtype=tl.int32)
        total += tl.sum(p, axis=1)
    acc = (t0.to(tl.int64) + (t1.to(tl.int64) << 8) + (t2.to(tl.int64) << 16)
           + (t3.to(tl.int64) << 24) + (t4.to(tl.int64) << 32))
    acc += C * total.to(tl.int64)[:, None]
    tl.store(total_ptr + heads, total.to(tl.float64), mask=r_ok)
    tl.store(acc_ptr + heads[:, None] * D + d[None, :], acc.to(tl.float64), mask=r_ok[:, None])


def planes(x: torch.Tensor) -> torch.Tensor:
    """Three int8 digit planes [3, *x.shape] of x - C (|x| < 2**23), low digit first."""
    y = x.to(torch.int32) - C
    out = []
    for _ in range(3):
        dig = (y << 24) >> 24
        out.append(dig.to(torch.int8))
        y = (y - dig) >> 8
    assert not y.any()
    return torch.stack(out)


def digit_attention(q, kd, vd, pos, table_i32, index_scale, out_scale, block=32, warps=4,
                    kernel=None):
    """decode_attention's output (int8 halves, shifts) for rotated queries q [B, Hkv, rep, 1,
    d] over the digit planes kd, vd [3, B, Hkv, capacity, d] at slots 0..pos[b]."""
    b, n_kv, rep, _, d = q.shape
    capacity = kd.shape[3]
    n_heads, heads = n_kv * rep, b * n_kv * rep
    dev = q.device
    scores = torch.empty((heads, capacity), dtype=torch.int64, device=dev)
    total = torch.empty((heads, 1), dtype=torch.float64, device=dev)
    acc = torch.empty((heads, 1, d), dtype=torch.float64, device=dev)
    hi = torch.empty((b, n_heads * d), dtype=torch.int8, device=dev)
    lo = torch.empty((b, n_heads * d), dtype=torch.int8, device=dev)
    shift = torch.empty((b, 1), dtype=torch.int64, device=dev)
    (kernel or _digit_kernel)[(b * n_kv,)](
        q.contiguous(), kd, vd, pos, scores, table_i32, index_scale, total, acc, n_heads, rep,
        n_kv, capacity, kd[0].numel(), table_i32.shape[0] - 1, C=C, D=d, R=16, BLOCK=block,
        num_warps=warps)
    cuda_attention._finish_kernel[(b,)](total, acc, hi, lo, shift, n_heads, N_SPLITS=1,
                                        OUT_SCALE=out_scale, ACT_BITS=ACT_BITS, D=d,
                                        HP=triton.next_power_of_2(n_heads), num_warps=4, PDL=False)
    return hi, lo, shift


@triton.jit
def _digits3(x, C: tl.constexpr):
    """Three int8 digit planes of x - C (int32, |x| < 2**23), low first."""
    x0, rest = _digit(x - C)
    x1, x2 = _digit(rest)
    return x0.to(tl.int8), x1.to(tl.int8), x2.to(tl.int8)


@triton.jit
def _digit_kernel3(q_ptr, k_ptr, v_ptr, pos_ptr, scores_ptr, table_ptr, scale_ptr, total_ptr,
                   acc_ptr, n_heads, rep, n_kv, capacity, window, table_last,
                   C: tl.constexpr, D: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
    """_digit_kernel2 over the engine's own int32 cache: each block of keys and values loaded
    as rows and split into digits in registers (no cache layout change); sliding windows."""
    kvh = tl.program_id(0)  # b * n_kv + j
    b, j = kvh // n_kv, kvh % n_kv
    pos = tl.load(pos_ptr + b)
    end = pos + 1
    start = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)
    r = tl.arange(0, R)
    d = tl.arange(0, D)
    s = tl.arange(0, BLOCK)
    r_ok = r < rep
    heads = (b * n_heads + j * rep + r).to(tl.int64)
    q = tl.load(q_ptr + heads[:, None] * D + d[None, :], mask=r_ok[:, None], other=0)
    q0, q_rest = _digit(q)
    q1, q_rest = _digit(q_rest)
    q2, q3 = _digit(q_rest)
    q0, q1, q2, q3 = q0.to(tl.int8), q1.to(tl.int8), q2.to(tl.int8), q3.to(tl.int8)
    q_sum = tl.sum(q.to(tl.int64), axis=1)
    base = kvh.to(tl.int64) * capacity * D
    best = tl.full([R, BLOCK], NEG, tl.int64)
    for first in range(start, end, BLOCK):
        keys = first + s
        valid = keys < end
        k = tl.load(k_ptr + base + keys[:, None] * D + d[None, :], mask=valid[:, None], other=0)
        k0, k1, k2 = _digits3(k, C)
        scores = _score_dots(q0, q1, q2, q3, tl.trans(k0), tl.trans(k1), tl.trans(k2))
        scores += C * q_sum[:, None]
        tl.store(scores_ptr + heads[:, None] * capacity + keys[None, :], scores,
                 mask=r_ok[:, None] & valid[None, :])
        best = tl.maximum(best, tl.where(valid[None, :], scores, NEG))
    top = tl.max(best, axis=1)
    tl.debug_barrier()
    index_scale = tl.load(scale_ptr)
    total = tl.zeros([R], tl.int32)
    t0 = tl.zeros([R, D], tl.int32)
    t1 = tl.zeros([R, D], tl.int32)
    t2 = tl.zeros([R, D], tl.int32)
    t3 = tl.zeros([R, D], tl.int32)
    t4 = tl.zeros([R, D], tl.int32)
    for first in range(start, end, BLOCK):
        keys = first + s
        valid = keys < end
        seen = r_ok[:, None] & valid[None, :]
        scores = tl.load(scores_ptr + heads[:, None] * capacity + keys[None, :], mask=seen,
                         other=0)
        idx = tl.minimum(tl.floor((top[:, None] - scores).to(tl.float64) * index_scale),
                         table_last)
        p = tl.load(table_ptr + idx.to(tl.int64), mask=seen, other=0)  # 0 .. 2**16
        p0, p_rest = _digit(p)
        p1, p2 = _digit(p_rest)
        p0, p1, p2 = p0.to(tl.int8), p1.to(tl.int8), p2.to(tl.int8)
        v = tl.load(v_ptr + base + keys[:, None] * D + d[None, :], mask=valid[:, None], other=0)
        v0, v1, v2 = _digits3(v, C)
        t0 = tl.dot(p0, v0, t0, out_dtype=tl.int32)
        t1 = tl.dot(p0, v1, tl.dot(p1, v0, t1, out_dtype=tl.int32), out_dtype=tl.int32)
        t2 = tl.dot(p0, v2, tl.dot(p1, v1, tl.dot(p2, v0, t2, out_dtype=tl.int32),
                                   out_dtype=tl.int32), out_dtype=tl.int32)
        t3 = tl.dot(p1, v2, tl.dot(p2, v1, t3, out_dtype=tl.int32), out_dtype=tl.int32)
        t4 = tl.dot(p2, v2, t4, out_dtype=tl.int32)
        total += tl.sum(p, axis=1)
    acc = (t0.to(tl.int64) + (t1.to(tl.int64) << 8) + (t2.to(tl.int64) << 16)
           + (t3.to(tl.int64) << 24) + (t4.to(tl.int64) << 32))
    acc += C * total.to(tl.int64)[:, None]
    tl.store(total_ptr + heads, total.to(tl.float64), mask=r_ok)
    tl.store(acc_ptr + heads[:, None] * D + d[None, :], acc.to(tl.float64), mask=r_ok[:, None])


def digit_attention3(q, k, v, pos, table_i32, index_scale, out_scale, window=0, block=32,
                     warps=4):
    """digit_attention over the int32 cache k, v [B, Hkv, capacity, d] itself."""
    b, n_kv, rep, _, d = q.shape
    capacity = k.shape[2]
    n_heads, heads = n_kv * rep, b * n_kv * rep
    dev = q.device
    scores = torch.empty((heads, capacity), dtype=torch.int64, device=dev)
    total = torch.empty((heads, 1), dtype=torch.float64, device=dev)
    acc = torch.empty((heads, 1, d), dtype=torch.float64, device=dev)
    hi = torch.empty((b, n_heads * d), dtype=torch.int8, device=dev)
    lo = torch.empty((b, n_heads * d), dtype=torch.int8, device=dev)
    shift = torch.empty((b, 1), dtype=torch.int64, device=dev)
    _digit_kernel3[(b * n_kv,)](q.contiguous(), k, v, pos, scores, table_i32, index_scale,
                                total, acc, n_heads, rep, n_kv, capacity, window,
                                table_i32.shape[0] - 1, C=C, D=d, R=16, BLOCK=block,
                                num_warps=warps)
    cuda_attention._finish_kernel[(b,)](total, acc, hi, lo, shift, n_heads, N_SPLITS=1,
                                        OUT_SCALE=out_scale, ACT_BITS=ACT_BITS, D=d,
                                        HP=triton.next_power_of_2(n_heads), num_warps=4, PDL=False)
    return hi, lo, shift


def case(b, n_kv, rep, d, capacity, positions, device, seed=0):
    """Random queries, keys and values over the engine's whole range (and at its bounds)."""
    from seqkv.engine import IntModel, integerize
    from tests.test_engine import MODELS

    model = IntModel(integerize(MODELS["llama"]().model), device)
    lim = min(model._qkv_limit, (1 << 23) - 1)  # head widths of 64 and more (narrower: 2**24)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-lim, lim + 1, (b, n_kv, rep, 1, d), generator=g)
    k = torch.randint(-lim, lim + 1, (b, n_kv, capacity, d), generator=g)
    v = torch.randint(-lim, lim + 1, (b, n_kv, capacity, d), generator=g)
    q[0, 0, 0, 0, :4] = torch.tensor([lim, -lim, lim, -lim])
    k[0, 0, :3], v[0, 0, :3] = lim, -lim
    k[0, 0, 3:5], v[0, 0, 3:5] = -lim, lim
    pos = torch.tensor(positions)[torch.arange(b) % len(positions)]
    return model, (q.to(device), k.to(torch.int32).to(device), v.to(torch.int32).to(device),
                   pos.to(device))


def compare(model, q, k, v, pos, kernel=None, window=0):
    out_scale = 1 << (FRAC - QKV_FRAC)
    want = cuda_attention.decode_attention(q, k, v, pos, window, model.exp_attn_f,
                                           model._index_scale_t, out_scale)
    if kernel == "int32":
        got = digit_attention3(q.to(torch.int32), k, v, pos, model.exp_attn.to(torch.int32),
                               model._index_scale_t, out_scale, window)
        return all(torch.equal(x, y) for x, y in zip(got, want, strict=True))
    got = digit_attention(q.to(torch.int32), planes(k), planes(v), pos,
                          model.exp_attn.to(torch.int32), model._index_scale_t, out_scale,
                          kernel=kernel)
    return all(torch.equal(x, y) for x, y in zip(got, want, strict=True))


def timed(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / reps


def main() -> None:
    sys.path.insert(0, ".")
    if "--check" in sys.argv:  # Triton's interpreter on the CPU
        for shape in ((2, 2, 3, 64, 70, [69, 5]), (3, 1, 4, 32, 40, [39, 0, 17])):
            model, t = case(*shape[:5], shape[5], "cpu")
            for kernel, window in ((_digit_kernel, 0), (_digit_kernel2, 0), ("int32", 0),
                                   ("int32", 7)):
                print(shape, kernel, window, "exact" if compare(model, *t, kernel, window)
                      else "MISMATCH", flush=True)
        return
    if "--once" in sys.argv:  # one call of each, for a profiler (ncu)
        model, (q, k, v, p) = case(1024, 3, 3, 64, 320, [250], "cuda", seed=0)
        out_scale = 1 << (FRAC - QKV_FRAC)
        q32, kd, vd = q.to(torch.int32), planes(k), planes(v)
        table, index = model.exp_attn.to(torch.int32), model._index_scale_t
        for _ in range(2):
            cuda_attention.decode_attention(q, k, v, p, 0, model.exp_attn_f, index, out_scale)
            digit_attention(q32, kd, vd, p, table, index, out_scale, 32, 4, _digit_kernel2)
            digit_attention3(q32, k, v, p, table, index, out_scale, 0, 32, 4)
        torch.cuda.synchronize()
        return
    for b, pos in ((64, 125), (256, 125), (1024, 125), (1024, 250)):
        time_case(b, pos)


def time_case(b: int, pos: int) -> None:
    """Exactness, then a layer's attention: digit planes against decode_attention."""
    model, (q, k, v, p) = case(b, 3, 3, 64, 320, [pos], "cuda", seed=b)
    print(f"{b} streams at position {pos}: exact {compare(model, q, k, v, p)}"
          f" {compare(model, q, k, v, p, _digit_kernel2)}", flush=True)
    out_scale = 1 << (FRAC - QKV_FRAC)
    kd, vd, q32 = planes(k), planes(v), q.to(torch.int32)
    table, index = model.exp_attn.to(torch.int32), model._index_scale_t
    print(f"   exact over the int32 cache: {compare(model, q, k, v, p, 'int32')}")
    ms = timed(partial(digit_attention, q32, kd, vd, p, table, index, out_scale, 32, 4,
                       _digit_kernel2))
    print(f"   digit planes (kernel 2): {ms * 1e3:.1f} us a layer")
    for block in (32, 64):
        for warps in (1, 2, 4, 8):
            ms = timed(partial(digit_attention3, q32, k, v, p, table, index, out_scale, 0,
                               block, warps))
            print(f"   int32 cache, digits in registers, {block}-key blocks, {warps} warps:"
                  f" {ms * 1e3:.1f} us a layer")
    ms = timed(partial(cuda_attention.decode_attention, q, k, v, p, 0, model.exp_attn_f, index,
                       out_scale))
    print(f"   decode_attention (int32 cache): {ms * 1e3:.1f} us a layer")

if __name__ == "__main__":
    main()
