"""Integer primitives of the engine: exact on every device, at any batch and thread count.

Values are int64 fixed-point tensors. Reductions are integer sums and maxima (exact in any
order); products that need a GEMM run as int8 x int8 -> int32 (``torch._int_mm``) or as
float products of integers whose partial sums stay below 2**24 (float32) or 2**53
(float64), exact on any IEEE machine in any order of summation. No
float rounding ever reaches a result, so the CPU and any GPU compute the same integers.
"""

from __future__ import annotations

import functools
import time
import weakref

import torch

ACT_BITS = 13  # GEMM inputs are quantized per row to |x| <= 2**13 (int14), split into two int8


def bit_length(x: torch.Tensor) -> torch.Tensor:
    """Bits of |x| (0 for 0), exact for |x| < 2**53 (frexp reads the float's exponent)."""
    return torch.frexp(x.abs().to(torch.float64)).exponent.to(torch.int64)


# Keys and values keep float16's precision, KV_BITS significant bits (engine 3): caches can
# then hold them as float16 x * 2**-KV_EXP, which every |x| <= 2**23 leaves in float16's normal
# range, exactly. On 32 Brown chunks of 256 tokens the rounding cost no bits (the engine coded
# 1.00054x the float model's cross-entropy with it, 1.00056x without; 5 bits would have done:
# benchmarks/dev/cpu_round_kv.py), and it halves the bytes a GPU's attention reads.
KV_BITS = 11
KV_EXP = 8


def round_kv(x: torch.Tensor) -> torch.Tensor:
    """Keys or values (integers, |x| <= 2**23) rounded to KV_BITS significant bits, ties to even
    (``round_kv_reference``), as int64: IEEE float16's rounding of x * 2**-KV_EXP, which every
    device performs alike."""
    return kv_integers(kv_float16(x))


def kv_float16(x: torch.Tensor) -> torch.Tensor:
    """round_kv(x) * 2**-KV_EXP as float16: how GPU caches hold keys and values."""
    return x.to(torch.float32).mul_(2.0**-KV_EXP).to(torch.float16)


def kv_float64(cached: torch.Tensor) -> torch.Tensor:
    """Cached keys or values (float16 as ``kv_float16`` gives them, or integers) as float64
    integers."""
    if cached.dtype == torch.float16:
        return cached.to(torch.float64).mul_(2.0**KV_EXP)
    return cached.to(torch.float64)


def kv_integers(cached: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Cached keys or values as integers of ``dtype`` (float16 ones through float32, exact
    for |x| <= 2**23)."""
    if cached.dtype == torch.float16:
        return cached.to(torch.float32).mul_(2.0**KV_EXP).to(dtype)
    return cached.to(dtype)


def round_kv_reference(x: int) -> int:
    """round_kv of one integer in integer arithmetic: the definition its float16 path meets."""
    a, sign = abs(x), -1 if x < 0 else 1
    drop = max(0, a.bit_length() - KV_BITS)
    if drop == 0:
        return x
    q, rem, half = a >> drop, a & ((1 << drop) - 1), 1 << (drop - 1)
    q += rem > half or (rem == half and q & 1)
    return sign * (q << drop)


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
    # Rounding is monotonic and every integer below 2**53 is a float64, so sqrt(n) >= m
    # gives fl(sqrt(n)) >= m: the estimate is never below floor(sqrt(n)), at most one above.
    return r - (r * r > n).to(torch.int64)


def quantize_rows(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row dyadic quantization: v ~ q * 2**k with |q| <= 2**ACT_BITS; returns (q, k)."""
    k = (bit_length(v.abs().amax(dim=-1)) - ACT_BITS).clamp(min=0)
    return rshift_round(v, k.unsqueeze(-1)), k


def int_matmul(hi: torch.Tensor, lo: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """2 * q @ A, exactly, as float64 [M, N] holding integers, for q = 128 hi + lo given as its
    int8 halves (``split_rows``) and wt = A, int8 [K, N].

    hi and lo are stacked as one GEMM's rows so each weight is read once: 2 q.A = 256 hi.A +
    2 lo.A exactly.
    """
    m = hi.shape[0]
    acc = _int8_gemm(torch.cat([hi, lo]), wt).to(torch.float64)
    return acc[:m] * 256 + acc[m:] * 2


def split_rows(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_rows(v) as its int8 halves: (hi, lo, k) with q = 128 hi + lo, |q| <= 2**ACT_BITS,
    lo in [-64, 63], k [..., 1]; the same integers as quantize_rows, in fewer passes."""
    low, high = torch.aminmax(v, dim=-1, keepdim=True)
    top = torch.maximum(high, low.neg())
    k = (torch.frexp(top.to(torch.float64)).exponent - ACT_BITS).clamp_(min=0).to(torch.int64)
    q = (v + ((1 << k) >> 1)) >> k  # rshift_round(v, k): + 2**(k-1) then floor, k >= 0
    hi = (q + 64) >> 7  # floor((q + 64) / 128): lo = q - 128 hi = ((q + 64) & 127) - 64
    lo = q - (hi << 7)
    return hi.to(torch.int8), lo.to(torch.int8), k


# A rescaling pass runs over this many float64 elements at a time on CPUs (a few MB, which
# stay in cache between the five passes, instead of one pass after another over memory).
_CHUNK = 1 << 19
# Up to this many rows (steps, bound by the weights' bytes) a CPU GEMM reads oneDNN's
# prepacked weights (_packed); more rows (prefills, bound by the multiplies) go to _int8_gemm.
PACKED_ROWS = 32


class RowGemm:
    """The integer GEMMs of one CPU linear layer over rows v [M, K] (int64, Q16), whose
    rescaled rows (``rows``) come in blocks, so a caller can consume them while in cache.

    rows(s, e) = round(2 q.A * scale * 2**k) exactly as int_matmul and model.linear compute
    it: the two int32 products are summed exactly in float64 (far below 2**53), then the same
    two multiplies (the second by a power of two) and the same IEEE rounding as before.
    """

    def __init__(self, v: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        hi, lo, k = split_rows(v)
        m, n = v.shape[0], w.shape[0]
        wt = w.t()
        x = torch.cat([hi, lo])  # one GEMM reads each weight once for both halves
        packed = _packed(w) if m <= PACKED_ROWS else None
        acc = _int8_gemm(x, wt) if packed is None else _packed_mm(x, packed)
        self.ha, self.la = acc[:m], acc[m:]
        self.pow2 = torch.ldexp(torch.ones_like(k, dtype=torch.float64), k)
        self.scale, self.bias, self.m, self.n = scale, bias, m, n
        self.block = max(1, _CHUNK // n)

    def rows(self, s: int, e: int) -> torch.Tensor:
        a = self.ha[s:e].to(torch.float64)
        a.mul_(256).add_(self.la[s:e], alpha=2)
        a.mul_(self.scale).mul_(self.pow2[s:e]).round_()
        y = a.to(torch.int64)
        return y.add_(self.bias) if self.bias is not None else y

    def all(self) -> torch.Tensor:
        if self.m <= self.block:
            return self.rows(0, self.m)
        out = torch.empty((self.m, self.n), dtype=torch.int64)
        for s in range(0, self.m, self.block):
            out[s : s + self.block] = self.rows(s, s + self.block)
        return out


# -- prepacked weights for CPU steps ----------------------------------------------------------
# oneDNN's quantized linear reads weights packed once in its own layout, where _int_mm
# repacks them on every call: 30-40% less time per decode step's GEMMs (measured on the
# 2-core EPYC). It returns float32 accumulators, exact while every |sum| <= 2**24: int8 halves
# |x| <= 64 against |w| <= 127 over K <= 2064 terms. A probe at first use compares it with
# _int_mm on extreme values; any difference or error and the step keeps _int_mm.
_PACK_MAX_K = (1 << 24) // (64 * 127)
_packs: dict[int, tuple[weakref.ref, tuple]] = {}
_pack_ok: bool | None = None


def _packed(w: torch.Tensor):
    global _pack_ok
    if w.device.type != "cpu" or w.shape[1] > _PACK_MAX_K:
        return None
    hit = _packs.get(id(w))
    if hit is not None and hit[0]() is w:
        return hit[1]
    if _pack_ok is None:
        _pack_ok = _probe()
    if not _pack_ok:
        return None
    n = w.shape[0]
    packed = (torch.ops.onednn.qlinear_prepack(w, None), torch.ones(n),
              torch.zeros(n, dtype=torch.int64))
    _packs[id(w)] = (weakref.ref(w), packed)
    weakref.finalize(w, _packs.pop, id(w), None)  # the packed copy goes with its weights
    return packed


def _packed_mm(x: torch.Tensor, packed: tuple) -> torch.Tensor:
    """int8 x [M, K] against the packed weights: x + 128 as uint8 with zero point 128 (oneDNN's
    fast path; signed inputs take a slow one), float32 [M, N]."""
    w, ones, zeros = packed
    return torch.ops.onednn.qlinear_pointwise(x.view(torch.uint8) ^ 128, 1.0, 128, w, ones,
                                              zeros, None, 1.0, 0, torch.float32, "none", [], "")


def _probe() -> bool:
    try:
        g = torch.Generator().manual_seed(0)
        k = _PACK_MAX_K
        w = torch.randint(-127, 128, (64, k), dtype=torch.int8, generator=g)
        w[:8], w[8:16, ::2], w[16:24] = 127, -127, -127
        x = torch.randint(-64, 65, (6, k), dtype=torch.int8, generator=g)
        x[0], x[1], x[2, ::3] = 64, -64, -64
        ones, zeros = torch.ones(64), torch.zeros(64, dtype=torch.int64)
        for rows in (x[:1], x):
            got = _packed_mm(rows, (torch.ops.onednn.qlinear_prepack(w, None), ones, zeros))
            if not torch.equal(got, torch._int_mm(rows, w.t()).to(torch.float32)):
                return False
        return True
    except Exception:  # no oneDNN quantized ops in this build
        return False


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
    if not _float_gemm_is_faster():
        return torch._int_mm(a, b)
    # A user's set_float32_matmul_precision("high" or "medium") lets float32 GEMMs round
    # (bf16 or tf32 inside): float64 then, exact at any precision setting.
    exact_f32 = torch.get_float32_matmul_precision() == "highest"
    return _f32_gemm(a, b) if exact_f32 else _f64_gemm(a, b)


# float32 sums of int8 x int8 products are exact while every partial sum is below 2**24:
# up to this many terms per product, whatever the order of summation (FMA included).
_F32_EXACT_K = (1 << 24) // (128 * 128)


def _f32_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 a [M, K] @ int8 b [K, N] -> int32 through float32 GEMMs over K in exact chunks."""
    out = None
    for s in range(0, a.shape[1], _F32_EXACT_K):
        part = (a[:, s : s + _F32_EXACT_K].to(torch.float32)
                @ b[s : s + _F32_EXACT_K].to(torch.float32)).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out


@functools.cache
def _float_gemm_is_faster() -> bool:
    """Timed once per process: torch._int_mm is a scalar loop on CPUs without VNNI (0.76 s for a
    1,024 x 576 x 1,152 product on the 2-core EPYC at 2 threads, float32 0.012 s, float64
    0.033 s) and fast where oneDNN has VNNI. All give the same integers; this picks the
    faster."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (128, 512), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (512, 256), dtype=torch.int8, generator=g)
    best = {}
    for name, gemm in (("int", torch._int_mm), ("f32", _f32_gemm)):
        gemm(a, b)
        t = time.perf_counter()
        gemm(a, b)
        best[name] = time.perf_counter() - t
    return best["f32"] < best["int"]


def _f64_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Products of int8s summed over K < 2**30 stay far below 2**53: exact in float64.
    return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)
