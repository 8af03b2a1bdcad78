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

from ..errors import SeqkvError
from . import packing
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


def _rotate_and_code(x: torch.Tensor, bits: int, seed: int, dt: torch.dtype):
    """Shared front half: norms, rotated unit vectors u, and (if bits > 0) codes and centroids."""
    d = x.shape[-1]
    xf = x.reshape(-1, d).to(dt)
    norms = torch.linalg.vector_norm(x.reshape(-1, d), dim=-1, dtype=torch.float32)
    rot = rotation_matrix(d, seed, _dev(x), dt)
    inv = (1.0 / norms.clamp_min(1e-30)).to(dt)
    # x R^T then scale rows: one GEMM; the zero vector maps to u = 0 and decodes to 0.
    u = (xf @ rot.T).mul_(inv.unsqueeze(-1))
    return norms, u


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


@dataclass(frozen=True)
class TurboQuantMSE:
    """TurboQuant-mse (arXiv 2504.19874, Algorithm 1): rotation + Lloyd-Max per coordinate.

    Stores b-bit codes per coordinate (bit-packed), one norm per vector (``norm_dtype``,
    float32 by default: float16 overflows above 65504) and the 64-bit seed.
    """

    bits: int = 3
    seed: int = 0
    norm_dtype: torch.dtype = torch.float32
    name: ClassVar[str] = "turboquant-mse"

    def __post_init__(self) -> None:
        _check_bits(self.name, self.bits, 1)

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        check_input(x, self.name)
        d, dt = x.shape[-1], compute_dtype(x)
        norms, u = _rotate_and_code(x, self.bits, self.seed, dt)
        _, bounds, _, _ = _codebook_tensors(d, self.bits, _dev(x), dt)
        codes = scalar_codes(u, bounds)
        lead = x.shape[:-1]
        data = {
            "codes": packing.pack(codes, self.bits).reshape(*lead, -1),
            "norms": norms.to(self.norm_dtype).reshape(lead),
        }
        params = {"bits": self.bits, "seed": self.seed}
        return QuantizedTensor(self.name, tuple(x.shape), x.dtype, data, params, SEED_BITS)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        check_quantized(q, self.name, ("codes", "norms"))
        bits, seed, d = int(q.params["bits"]), int(q.params["seed"]), q.shape[-1]
        codes = q.data["codes"]
        codes = codes.reshape(-1, codes.shape[-1])
        probe = torch.empty(0, dtype=q.dtype, device=codes.device)
        dt = compute_dtype(probe)
        cents, _, table, width = _codebook_tensors(d, bits, _dev(codes), dt)
        vals = _decode(codes, bits, d, cents, table, width)
        rot = rotation_matrix(d, seed, _dev(codes), dt)
        out = (vals @ rot).mul_(q.data["norms"].reshape(-1, 1).to(dt))
        return out.to(q.dtype).reshape(q.shape)


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
    and the residual norm (``norm_dtype``), and the seed.
    """

    bits: int = 3
    seed: int = 0
    norm_dtype: torch.dtype = torch.float32
    name: ClassVar[str] = "turboquant-prod"

    def __post_init__(self) -> None:
        _check_bits(self.name, self.bits, 1)

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        check_input(x, self.name)
        d, dt, lead = x.shape[-1], compute_dtype(x), x.shape[:-1]
        norms, u = _rotate_and_code(x, self.bits - 1, self.seed, dt)
        data: dict[str, torch.Tensor] = {}
        if self.bits > 1:
            cents, bounds, _, _ = _codebook_tensors(d, self.bits - 1, _dev(x), dt)
            codes = scalar_codes(u, bounds)
            data["codes"] = packing.pack(codes, self.bits - 1).reshape(*lead, -1)
            u = u - cents[codes.long()]  # the residual, in rotated coordinates
        rnorm = torch.linalg.vector_norm(u, dim=-1, dtype=torch.float32)
        # S is Gaussian, so sketching the rotated residual is distributed as sketching r itself.
        signs = (u @ qjl_matrix(d, self.seed, _dev(x), dt).T) >= 0
        data["signs"] = packing.pack(signs, 1).reshape(*lead, -1)
        data["norms"] = norms.to(self.norm_dtype).reshape(lead)
        data["residual_norms"] = rnorm.to(self.norm_dtype).reshape(lead)
        params = {"bits": self.bits, "seed": self.seed}
        return QuantizedTensor(self.name, tuple(x.shape), x.dtype, data, params, SEED_BITS)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        check_quantized(q, self.name, ("signs", "norms", "residual_norms"))
        bits, seed, d = int(q.params["bits"]), int(q.params["seed"]), q.shape[-1]
        signs = q.data["signs"]
        signs = signs.reshape(-1, signs.shape[-1])
        dev = _dev(signs)
        dt = compute_dtype(torch.empty(0, dtype=q.dtype, device=signs.device))
        z = packing.decode_with_table(signs, _sign_table(dev, dt), 8, d)
        scale = q.data["residual_norms"].reshape(-1, 1).to(dt) * (math.sqrt(math.pi / 2) / d)
        vals = (z @ qjl_matrix(d, seed, dev, dt)).mul_(scale)
        if bits > 1:
            if "codes" not in q.data:
                raise SeqkvError(f"{self.name}: quantized tensor lacks ['codes']")
            codes = q.data["codes"]
            cents, _, table, width = _codebook_tensors(d, bits - 1, dev, dt)
            vals += _decode(codes.reshape(-1, codes.shape[-1]), bits - 1, d, cents, table, width)
        out = (vals @ rotation_matrix(d, seed, dev, dt)).mul_(q.data["norms"].reshape(-1, 1).to(dt))
        return out.to(q.dtype).reshape(q.shape)


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
    name: ClassVar[str] = "turboquant-outlier"

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 7:
            raise SeqkvError(f"{self.name}: bits must be in 1..7, got {self.bits!r}")

    def _split(self, d: int) -> tuple[int, int, int]:
        lo = int(math.floor(self.bits))
        frac = self.bits - lo
        k = self.outlier_channels if self.outlier_channels is not None else round(frac * d)
        if not 0 < k < d:
            raise SeqkvError(f"{self.name}: need 0 < outlier channels < d, got {k} of {d}")
        return lo + 1, lo, k

    def _parts(self, hi: int, lo: int, seed: int) -> tuple[TurboQuantMSE, TurboQuantMSE]:
        return TurboQuantMSE(hi, seed, self.norm_dtype), TurboQuantMSE(
            lo, seed + 1, self.norm_dtype
        )

    @staticmethod
    def _order(mask: torch.Tensor) -> torch.Tensor:
        # Outlier channels first, each group in ascending channel order (stable sort).
        return torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        check_input(x, self.name)
        d = x.shape[-1]
        hi_bits, lo_bits, k = self._split(d)
        x3 = x.reshape(1, 1, d) if x.dim() == 1 else x.reshape(-1, x.shape[-2], d)
        score = x3.float().pow(2).mean(dim=-2)  # (S, d): per-slice channel energy
        top = score.topk(k, dim=-1).indices
        mask = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
        order = self._order(mask)
        xs = x3.gather(-1, order.unsqueeze(1).expand_as(x3))
        parts = self._parts(hi_bits, lo_bits, self.seed)
        qh, ql = (p.quantize(t) for p, t in zip(parts, (xs[..., :k], xs[..., k:]), strict=True))
        slices = x.shape[:-2] if x.dim() > 1 else ()
        data = {"mask": packing.pack(mask, 1).reshape(*slices, -1)}
        data |= {f"hi.{n}": t for n, t in qh.data.items()}
        data |= {f"lo.{n}": t for n, t in ql.data.items()}
        params = {"bits": self.bits, "seed": self.seed, "outlier_channels": k}
        return QuantizedTensor(self.name, tuple(x.shape), x.dtype, data, params, SEED_BITS)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        check_quantized(q, self.name, ("mask", "hi.codes", "hi.norms", "lo.codes", "lo.norms"))
        d = q.shape[-1]
        k = int(q.params["outlier_channels"])
        t = 1 if len(q.shape) == 1 else q.shape[-2]
        mask = packing.unpack(q.data["mask"].reshape(-1, q.data["mask"].shape[-1]), 1, d).bool()
        if int(mask[0].sum()) != k:
            raise SeqkvError(f"{self.name}: outlier mask does not match {k} channels")
        lo = math.floor(float(q.params["bits"]))
        parts = self._parts(lo + 1, lo, int(q.params["seed"]))
        outs = []
        for p, pre, m in zip(parts, ("hi.", "lo."), (k, d - k), strict=True):
            sub = {n.removeprefix(pre): v for n, v in q.data.items() if n.startswith(pre)}
            shape = (mask.shape[0], t, m)
            sub = {
                n: v.reshape(*shape[:-1], -1) if n == "codes" else v.reshape(shape[:-1])
                for n, v in sub.items()
            }
            qs = QuantizedTensor(p.name, shape, q.dtype, sub, {"bits": p.bits, "seed": p.seed})
            outs.append(p.dequantize(qs))
        xs = torch.cat(outs, dim=-1)
        order = self._order(mask).unsqueeze(1).expand_as(xs)
        return torch.empty_like(xs).scatter_(-1, order, xs).reshape(q.shape)
