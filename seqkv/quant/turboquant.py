"""TurboQuant: near-optimal data-oblivious vector quantization (arXiv 2504.19874).

Zandieh, Daliri, Hadian, Mirrokni, "TurboQuant: Online Vector Quantization with Near-optimal
Distortion Rate" (2025). A seeded random rotation makes every coordinate of a unit vector follow
the same known density (Lemma 1); an optimal scalar quantizer per coordinate is then within a
small constant of the Shannon bound. Two variants:

* TurboQuant-mse (Algorithm 1): rotate, Lloyd-Max quantize each coordinate, keep the norm.
  Minimizes E||x - x~||^2 but inner products are biased (shrunk).
* TurboQuant-prod (Algorithm 2): (b-1)-bit TurboQuant-mse plus a 1-bit QJL sketch of the
  residual, sign(S r) and ||r||, which makes <y, x~> an unbiased estimate of <y, x>.

Both run as batched torch ops on any device; the rotation and QJL matrices are regenerated
from the stored seed, so only codes, norms and the seed are stored.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.errors import SeqkvError
from . import jit, packing
from .base import SEED_BITS, QuantizedTensor, check_input, check_quantized
from .lloyd_max import lloyd_max_codebook

_QJL_SALT = 0x5EED_0F_0011  # QJL's Gaussian matrix comes from another stream than the rotation


@functools.lru_cache(maxsize=64)
def rotation_matrix(dim: int, seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Haar-random orthogonal d x d matrix from a seed (QR of a Gaussian, signs fixed).

    Generated in float64 on the CPU so every device gets the same matrix from the same seed.
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    # A 128 x 128 QR takes ~1 ms on one thread but can stall for 100+ ms in a contended
    # OpenMP pool, so it runs single-threaded (the thread count is restored right after).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q, r = torch.linalg.qr(a)
    finally:
        torch.set_num_threads(threads)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # makes the distribution exactly Haar
    return q.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def qjl_matrix(dim: int, seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The QJL projection S (d x d, i.i.d. N(0, 1)) from a seed."""
    g = torch.Generator().manual_seed((seed ^ _QJL_SALT) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randn(dim, dim, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _codebook_tensors(dim: int, bits: int, device: str, dtype: torch.dtype):
    cb = lloyd_max_codebook(dim, bits)
    cents = torch.tensor(cb.centroids, dtype=torch.float64)
    table, width = packing.lookup_table(cents, bits)
    return (
        cents.to(device=device, dtype=dtype),
        torch.tensor(cb.boundaries, dtype=torch.float64).to(device=device, dtype=dtype),
        table.to(device=device, dtype=dtype),
        width,
    )


@functools.lru_cache(maxsize=8)
def _sign_table(device: str, dtype: torch.dtype):
    table, _ = packing.lookup_table(torch.tensor([-1.0, 1.0], dtype=torch.float64), 1)
    return table.to(device=device, dtype=dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 on the CPU (its half-precision matmuls are slow); the input's 16-bit dtype on GPUs.

    On a GPU, bf16 rounding of the rotated coordinates (relative 2^-9) adds < 0.1% to the
    distortion even at 4 bits, and halves the memory traffic of every pass.
    """
    if x.device.type != "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        return x.dtype
    return torch.float32


def _dev(x: torch.Tensor) -> str:
    return str(x.device)


@functools.lru_cache(maxsize=64)
def _rotation_t(dim: int, seed: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    return rotation_matrix(dim, seed, device, dtype).T.contiguous()


@functools.lru_cache(maxsize=64)
def _qjl_t(dim: int, seed: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    return qjl_matrix(dim, seed, device, dtype).T.contiguous()


@functools.lru_cache(maxsize=64)
def cell_thresholds(dim: int, bits: int) -> tuple[float, ...]:
    """The float32 cell boundaries as Python floats (static constants of the CPU kernels)."""
    return tuple(torch.tensor(lloyd_max_codebook(dim, bits).boundaries).float().tolist())


def _cpu_eager(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _rotate(x: torch.Tensor, rot_t: torch.Tensor):
    """Norms (float32) and the rotated unit vectors u = x R^T / ||x|| (zero maps to zero)."""
    norms = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
    inv = 1.0 / norms.clamp_min(1e-30)
    y = x.to(rot_t.dtype) @ rot_t  # one GEMM (bf16 on GPUs, float32 on the CPU)
    if torch.compiler.is_compiling():
        return norms, y.float() * inv.unsqueeze(-1)  # fused into the quantizer's kernel
    return norms, y.mul_(inv.to(y.dtype).unsqueeze(-1))


def float_codes(u: torch.Tensor, thr: tuple[float, ...]) -> torch.Tensor:
    """Lloyd-Max cell indices as float32 with vectorized float ops only (the CPU path).

    Equal to ``bucketize(u, thr)`` (ties go to the lower cell). ATen's comparisons write bool
    through a scalar loop (~1 ns per element and boundary) while sign/add/mul stay in SIMD, so
    cells are counted with signs: with the boundaries symmetric about their middle one (0),
    S = sum_t sign(|u| - t) over the positive ones gives cnt + 1/2 = (S + |P| + 1) / 2 and the
    cell is floor(L/2 - 1/2 + sign(u) (cnt + 1/2)); the floor settles exact ties.
    """
    levels = len(thr) + 1
    half = levels // 2
    pos = thr[half:]
    s0 = torch.sign(u)
    if not pos:  # 1 bit: the cell is u > 0
        return s0.add_(1.0).mul_(0.5).floor_()
    a = u.abs()
    s = torch.sub(a, pos[0]).sign_()
    buf = torch.empty_like(a)
    for t in pos[1:]:
        s.add_(torch.sub(a, t, out=buf).sign_())
    return s.add_(len(pos) + 1).mul_(s0).mul_(0.5).add_(half - 0.5).floor_()


def _symmetric(thr: tuple[float, ...]) -> bool:
    n = len(thr)
    return n % 2 == 1 and thr[n // 2] == 0.0 and all(thr[i] == -thr[n - 1 - i] for i in range(n))


def _encode_codes(u: torch.Tensor, bounds: torch.Tensor, bits: int, thr: tuple[float, ...]):
    """Packed codes of u, and the codes themselves (for centroid lookups)."""
    d = u.shape[-1]
    if _cpu_eager(u) and bits <= 4 and d % 8 == 0 and u.dtype == torch.float32 and _symmetric(thr):
        codes = float_codes(u, thr)
        return packing.pack_float_codes(codes, bits), codes
    if _cpu_eager(u):
        codes = scalar_codes(u, bounds.to(u.dtype))
    else:
        codes = torch.bucketize(u, bounds.to(u.dtype), out_int32=True)
    return packing.pack(codes, bits), codes


def _mse_encode(x: torch.Tensor, rot_t: torch.Tensor, bounds: torch.Tensor, *, bits, thr):
    """Kernel: rows x (n, d) -> packed codes (n, B) and float32 norms (n,)."""
    norms, u = _rotate(x, rot_t)
    return _encode_codes(u, bounds, bits, thr)[0], norms


def _decode_values(codes, cents, table, *, bits, d):
    """Packed codes -> codebook values (n, d) in cents' dtype."""
    if torch.compiler.is_compiling():  # shifts plus a 2^b-entry gather fuse into one kernel
        return cents[packing.unpack(codes, bits, d).long()]
    return _decode(codes, bits, d, cents, table, packing.lookup_width(bits))


def _scale_rows(y: torch.Tensor, norms: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return (y.float() * norms.float().unsqueeze(-1)).to(out_dtype)
    return y.mul_(norms.to(y.dtype).unsqueeze(-1)).to(out_dtype)


def _mse_decode(codes, norms, rot, cents, table, *, bits, d, out_dtype):
    """Kernel: packed codes (n, B) and norms (n,) -> vectors (n, d) in out_dtype."""
    vals = _decode_values(codes, cents, table, bits=bits, d=d)
    return _scale_rows(vals @ rot, norms, out_dtype)


def _prod_encode(x, rot_t, qjl_t, bounds, cents, *, bits, thr):
    """Kernel: rows x -> (packed (bits-1)-bit codes, packed signs, norms, residual norms)."""
    norms, u = _rotate(x, rot_t)
    if bits > 1:
        packed, codes = _encode_codes(u, bounds, bits - 1, thr)
        r = u - cents.to(u.dtype)[codes.long()]  # the residual, in rotated coordinates
    else:
        packed, r = u.new_empty((u.shape[0], 0), dtype=torch.uint8), u
    rnorm = torch.linalg.vector_norm(r, dim=-1, dtype=torch.float32)
    # S is Gaussian, so sketching the rotated residual is distributed as sketching r itself.
    s = r.to(qjl_t.dtype) @ qjl_t
    if _cpu_eager(s) and s.shape[-1] % 8 == 0:
        # sign bit = [s >= 0] = ceil((sign(s) + 1) / 2), in SIMD float ops (see float_codes)
        signs = packing.pack_float_codes(s.sign_().add_(1.0).mul_(0.5).ceil_(), 1)
    else:
        signs = packing.pack(s >= 0, 1)
    return packed, signs, norms, rnorm


def _prod_decode(
    signs, rnorms, norms, codes, rot, qjl, sign_table, cents, table, *, bits, d, out_dtype
):
    """Kernel: QJL signs, norms and (bits-1)-bit codes -> vectors (n, d) in out_dtype."""
    if torch.compiler.is_compiling():
        z = packing.unpack(signs, 1, d).to(qjl.dtype) * 2 - 1
    else:
        z = packing.decode_with_table(signs, sign_table, 8, d)
    scale = rnorms.to(torch.float32) * (math.sqrt(math.pi / 2) / d)
    vals = z @ qjl
    if torch.compiler.is_compiling():
        vals = vals.float() * scale.unsqueeze(-1)
    else:
        vals = vals.mul_(scale.to(vals.dtype).unsqueeze(-1))
    if bits > 1:
        vals = vals + _decode_values(codes, cents, table, bits=bits - 1, d=d).to(vals.dtype)
    return _scale_rows(vals.to(rot.dtype) @ rot, norms, out_dtype)


def scalar_codes(u: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Index of the Lloyd-Max cell of every coordinate (ties go to the lower cell).

    On GPUs ``bucketize`` is one pass. On the CPU it is a scalar binary search (~20 ns per
    element), while summing comparisons is vectorized: up to 8 levels that is 2^b - 1 passes;
    at 16 levels the codebook's symmetry halves it (compare |u| with the positive boundaries).
    """
    levels = bounds.numel() + 1
    if u.device.type != "cpu" or levels > 16:
        return torch.bucketize(u, bounds, out_int32=True)
    if levels <= 8:
        out = (u > bounds[0]).to(torch.uint8)
        for t in bounds[1:].tolist():
            out += u > t
        return out
    half = levels // 2
    a = u.abs()
    cnt = (a > bounds[half]).to(torch.uint8)  # bounds[half - 1] is the zero boundary
    for t in bounds[half + 1 :].tolist():
        cnt += a > t
    pos = u > bounds[half - 1]
    return torch.where(pos, cnt + half, (half - 1) - cnt)


def _check_bits(name: str, bits: int, low: int) -> None:
    if not isinstance(bits, int) or not low <= bits <= 8:
        raise SeqkvError(f"{name}: bits must be an integer in {low}..8, got {bits!r}")


def _check_codes(name: str, codes: torch.Tensor, d: int, bits: int, key: str = "codes") -> None:
    if codes.dtype != torch.uint8 or codes.shape[-1] != packing.packed_row_bytes(d, bits):
        raise SeqkvError(
            f"{name}: {key} rows are {codes.shape[-1]} x {codes.dtype}, expected "
            f"{packing.packed_row_bytes(d, bits)} x uint8 for {d} x {bits}-bit codes"
        )


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


@dataclass(frozen=True)
class TurboQuantMSE:
    """TurboQuant-mse (arXiv 2504.19874, Algorithm 1): rotation + Lloyd-Max per coordinate.

    Stores b-bit codes per coordinate (bit-packed), one norm per vector (``norm_dtype``,
    float32 by default: float16 overflows above 65504) and the 64-bit seed. ``compile``:
    see :mod:`seqkv.quant.jit` ("auto": torch.compile on CUDA, eager on the CPU).
    """

    bits: int = 3
    seed: int = 0
    norm_dtype: torch.dtype = torch.float32
    compile: jit.CompileMode = "auto"
    name: ClassVar[str] = "turboquant-mse"

    def __post_init__(self) -> None:
        _check_bits(self.name, self.bits, 1)
        jit.check_mode(self.compile)

    def _encode(self, x2: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        dt, dev = compute_dtype(x2), _dev(x2)
        _, bounds, _, _ = _codebook_tensors(d, self.bits, dev, torch.float32)
        args = (x2, _rotation_t(d, self.seed, dev, dt), bounds)
        static = {"bits": self.bits, "thr": cell_thresholds(d, self.bits)}
        return jit.run(_mse_encode, self.compile, args, static, rows=1)

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        check_input(x, self.name)
        d, lead = x.shape[-1], x.shape[:-1]
        codes, norms = self._encode(_rows(x), d)
        data = {
            "codes": codes.reshape(*lead, -1),
            "norms": norms.to(self.norm_dtype).reshape(lead),
        }
        params = {"bits": self.bits, "seed": self.seed}
        return QuantizedTensor(self.name, tuple(x.shape), x.dtype, data, params, SEED_BITS)

    def _decode(self, codes, norms, d, bits, seed, dtype) -> torch.Tensor:
        dev = _dev(codes)
        dt = compute_dtype(torch.empty(0, dtype=dtype, device=codes.device))
        cents, _, table, _ = _codebook_tensors(d, bits, dev, dt)
        args = (_rows(codes), norms.reshape(-1), rotation_matrix(d, seed, dev, dt), cents, table)
        static = {"bits": bits, "d": d, "out_dtype": dtype}
        return jit.run(_mse_decode, self.compile, args, static, rows=2)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        check_quantized(q, self.name, ("codes", "norms"))
        bits, seed, d = int(q.params["bits"]), int(q.params["seed"]), q.shape[-1]
        _check_codes(self.name, q.data["codes"], d, bits)
        out = self._decode(q.data["codes"], q.data["norms"], d, bits, seed, q.dtype)
        return out.reshape(q.shape)


def _decode(codes, bits, d, cents, table, width):
    if width:
        return packing.decode_with_table(codes, table, width, d)
    return cents[packing.unpack(codes, bits, d).long()]


@dataclass(frozen=True)
class TurboQuantProd:
    """TurboQuant-prod (arXiv 2504.19874, Algorithm 2): unbiased inner products.

    (bits - 1)-bit TurboQuant-mse of the unit vector, then the 1-bit QJL sketch sign(S r) of
    the residual r with its norm ||r||; dequantization adds sqrt(pi/2)/d * ||r|| * S^T sign(S r),
    so E[<y, x~>] = <y, x>. bits = 1 is QJL alone. Stores codes, the sign bits, the vector norm
    and the residual norm (``norm_dtype``), and the seed. ``compile``: as for TurboQuantMSE.
    """

    bits: int = 3
    seed: int = 0
    norm_dtype: torch.dtype = torch.float32
    compile: jit.CompileMode = "auto"
    name: ClassVar[str] = "turboquant-prod"

    def __post_init__(self) -> None:
        _check_bits(self.name, self.bits, 1)
        jit.check_mode(self.compile)

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        check_input(x, self.name)
        d, dt, lead, dev = x.shape[-1], compute_dtype(x), x.shape[:-1], _dev(x)
        mb = max(self.bits - 1, 1)  # the mse part's width (unused at bits = 1)
        cents, bounds, _, _ = _codebook_tensors(d, mb, dev, torch.float32)
        args = (_rows(x), _rotation_t(d, self.seed, dev, dt), _qjl_t(d, self.seed, dev, dt))
        static = {"bits": self.bits, "thr": cell_thresholds(d, mb)}
        codes, signs, norms, rnorm = jit.run(
            _prod_encode, self.compile, (*args, bounds, cents), static, rows=1
        )
        data: dict[str, torch.Tensor] = {}
        if self.bits > 1:
            data["codes"] = codes.reshape(*lead, -1)
        data["signs"] = signs.reshape(*lead, -1)
        data["norms"] = norms.to(self.norm_dtype).reshape(lead)
        data["residual_norms"] = rnorm.to(self.norm_dtype).reshape(lead)
        params = {"bits": self.bits, "seed": self.seed}
        return QuantizedTensor(self.name, tuple(x.shape), x.dtype, data, params, SEED_BITS)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        check_quantized(q, self.name, ("signs", "norms", "residual_norms"))
        bits, seed, d = int(q.params["bits"]), int(q.params["seed"]), q.shape[-1]
        signs = _rows(q.data["signs"])
        _check_codes(self.name, signs, d, 1, "signs")
        dev = _dev(signs)
        dt = compute_dtype(torch.empty(0, dtype=q.dtype, device=signs.device))
        if bits > 1:
            if "codes" not in q.data:
                raise SeqkvError(f"{self.name}: quantized tensor lacks ['codes']")
            codes = _rows(q.data["codes"])
            _check_codes(self.name, codes, d, bits - 1)
        else:
            codes = signs[:, :0]
        cents, _, table, _ = _codebook_tensors(d, max(bits - 1, 1), dev, dt)
        args = (
            signs,
            q.data["residual_norms"].reshape(-1),
            q.data["norms"].reshape(-1),
            codes,
            rotation_matrix(d, seed, dev, dt),
            qjl_matrix(d, seed, dev, dt),
            _sign_table(dev, dt),
            cents,
            table,
        )
        static = {"bits": bits, "d": d, "out_dtype": q.dtype}
        return jit.run(_prod_decode, self.compile, args, static, rows=4).reshape(q.shape)


def _outlier_split(x3: torch.Tensor, *, k: int):
    """Kernel: (S, T, d) -> packed outlier mask (S, d/8), outlier rows (S*T, k), rest (S*T, d-k).

    The outlier channels of a slice are its k of largest energy over the tokens; each group keeps
    ascending channel order. Positions come from cumulative counts (no sort, no host sync).
    """
    s_, t_, d = x3.shape
    score = x3.float().pow(2).mean(dim=-2)  # (S, d): per-slice channel energy
    top = score.topk(k, dim=-1).indices
    mask = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
    order = _channel_order(mask, k)
    xs = x3.gather(-1, order.unsqueeze(1).expand(s_, t_, d))
    return packing.pack(mask, 1), xs[..., :k].reshape(-1, k), xs[..., k:].reshape(-1, d - k)


def _channel_order(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Channel at each position of the split layout: outliers first, each group ascending."""
    m = mask.to(torch.int64)
    dest = torch.where(mask, m.cumsum(-1) - 1, k + (1 - m).cumsum(-1) - 1)
    ch = torch.arange(mask.shape[-1], device=mask.device).expand_as(dest)
    return torch.empty_like(dest).scatter_(-1, dest, ch)


def _outlier_merge(hi: torch.Tensor, lo: torch.Tensor, mask: torch.Tensor, *, k: int, d: int):
    """Kernel: split-layout halves (S, T, k), (S, T, d-k) and packed masks -> (S, T, d)."""
    m = packing.unpack(mask, 1, d).bool()
    mi = m.to(torch.int64)
    dest = torch.where(m, mi.cumsum(-1) - 1, k + (1 - mi).cumsum(-1) - 1)
    xs = torch.cat([hi, lo], dim=-1)
    return xs.gather(-1, dest.unsqueeze(1).expand_as(xs))


@dataclass(frozen=True)
class TurboQuantOutlier:
    """TurboQuant with the outlier-channel split of arXiv 2504.19874 (Sec. 4.3, 2.5/3.5 bits).

    Channels are split into an outlier set (the ``outlier_channels`` with the largest RMS over
    the tokens of each (..., T, d) slice) and the rest; two independent TurboQuant-mse instances
    quantize them at ``ceil(bits)`` and ``floor(bits)`` bits. By default the outlier count is
    chosen so the code bits average exactly ``bits`` (half the channels at 2.5 bits); the paper's
    own setting is 32 of 128 channels (``outlier_channels=32``). Stores both sub-quantizers'
    codes and norms, the d-bit outlier mask per slice, and one seed.
    """

    bits: float = 2.5
    seed: int = 0
    outlier_channels: int | None = None
    norm_dtype: torch.dtype = torch.float32
    compile: jit.CompileMode = "auto"
    name: ClassVar[str] = "turboquant-outlier"

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 7:
            raise SeqkvError(f"{self.name}: bits must be in 1..7, got {self.bits!r}")
        jit.check_mode(self.compile)

    def _split(self, d: int) -> tuple[int, int, int]:
        lo = int(math.floor(self.bits))
        frac = self.bits - lo
        k = self.outlier_channels if self.outlier_channels is not None else round(frac * d)
        if not 0 < k < d:
            raise SeqkvError(f"{self.name}: need 0 < outlier channels < d, got {k} of {d}")
        return lo + 1, lo, k

    def _parts(self, hi: int, lo: int, seed: int) -> tuple[TurboQuantMSE, TurboQuantMSE]:
        return TurboQuantMSE(hi, seed, self.norm_dtype, self.compile), TurboQuantMSE(
            lo, seed + 1, self.norm_dtype, self.compile
        )

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        check_input(x, self.name)
        d = x.shape[-1]
        hi_bits, lo_bits, k = self._split(d)
        x3 = x.reshape(1, 1, d) if x.dim() == 1 else x.reshape(-1, x.shape[-2], d)
        mask, xh, xl = jit.run(_outlier_split, self.compile, (x3,), {"k": k})
        parts = self._parts(hi_bits, lo_bits, self.seed)
        lead = x.shape[:-1]
        slices = x.shape[:-2] if x.dim() > 1 else ()
        data = {"mask": mask.reshape(*slices, -1)}
        for p, pre, xp in zip(parts, ("hi.", "lo."), (xh, xl), strict=True):
            codes, norms = p._encode(xp, xp.shape[-1])
            data[pre + "codes"] = codes.reshape(*lead, -1)
            data[pre + "norms"] = norms.to(self.norm_dtype).reshape(lead)
        params = {"bits": self.bits, "seed": self.seed, "outlier_channels": k}
        return QuantizedTensor(self.name, tuple(x.shape), x.dtype, data, params, SEED_BITS)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        check_quantized(q, self.name, ("mask", "hi.codes", "hi.norms", "lo.codes", "lo.norms"))
        d = q.shape[-1]
        k = int(q.params["outlier_channels"])
        if not 0 < k < d:
            raise SeqkvError(f"{self.name}: need 0 < outlier channels < d, got {k} of {d}")
        t = 1 if len(q.shape) == 1 else q.shape[-2]
        mask = _rows(q.data["mask"])
        _check_codes(self.name, mask, d, 1, "mask")
        if mask.device.type == "cpu":  # on GPUs this check would cost a host sync
            if not bool((packing.unpack(mask, 1, d).sum(-1) == k).all()):
                raise SeqkvError(f"{self.name}: outlier mask does not match {k} channels")
        lo = math.floor(float(q.params["bits"]))
        parts = self._parts(lo + 1, lo, int(q.params["seed"]))
        outs = []
        for p, pre, m in zip(parts, ("hi.", "lo."), (k, d - k), strict=True):
            codes = q.data[pre + "codes"]
            _check_codes(self.name, codes, m, p.bits, pre + "codes")
            out = p._decode(codes, q.data[pre + "norms"], m, p.bits, p.seed, q.dtype)
            outs.append(out.reshape(mask.shape[0], t, m))
        merged = jit.run(_outlier_merge, self.compile, (*outs, mask), {"k": k, "d": d})
        return merged.reshape(q.shape)
