"""KIVI: tuning-free asymmetric 2-bit KV cache quantization (arXiv 2402.02750).

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024).
Keys have outlier *channels*, so they are quantized per channel (min/max over a group of
``group_size`` tokens); values are quantized per token (min/max over ``group_size`` channels).
The most recent ``residual`` tokens stay in full precision; for keys, tokens that do not fill a
whole group stay there too. Asymmetric uniform b-bit codes, float16 scale and zero point per
group, as in the paper. Expects (..., T, d) tensors: tokens on axis -2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..core.errors import SeqkvError
from . import jit, packing
from .base import QuantizedTensor, check_input, check_quantized


@dataclass(frozen=True)
class KIVI:
    """KIVI (arXiv 2402.02750): ``axis="channel"`` for keys, ``axis="token"`` for values.

    Stores bit-packed codes, a ``scale_dtype`` scale and zero point per group, and the
    full-precision window in the input dtype; all of it is counted in ``.bits``.
    ``compile``: see :mod:`seqkv.quant.jit` ("auto": torch.compile on CUDA, eager on the CPU).
    """

    bits: int = 2
    axis: Literal["channel", "token"] = "token"
    group_size: int = 32
    residual: int = 0
    scale_dtype: torch.dtype = torch.float16
    compile: jit.CompileMode = "auto"
    name: ClassVar[str] = "kivi"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise SeqkvError(f"kivi: bits must be an integer in 1..8, got {self.bits!r}")
        if self.axis not in ("channel", "token"):
            raise SeqkvError(
                f"kivi: axis must be 'channel' (keys) or 'token' (values), got {self.axis!r}"
            )
        if self.group_size < 1 or self.residual < 0:
            raise SeqkvError("kivi: group_size must be >= 1 and residual >= 0")
        jit.check_mode(self.compile)

    @property
    def token_block(self) -> int:
        """Tokens a cache must gather before quantizing (keys: a whole group along tokens)."""
        return self.group_size if self.axis == "channel" else 1

    def _split_point(self, t: int) -> int:
        n = max(t - self.residual, 0)
        return n - n % self.group_size if self.axis == "channel" else n

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        check_input(x, self.name, min_dims=2)
        t = x.shape[-2]
        n = self._split_point(t)
        recent = x[..., n:, :]
        data: dict[str, torch.Tensor] = {}
        if n:
            static = {
                "bits": self.bits,
                "axis": self.axis,
                "group_size": self.group_size,
                "scale_dtype": self.scale_dtype,
            }
            codes, scale, zero = jit.run(_encode, self.compile, (x[..., :n, :],), static)
            data = {"codes": codes, "scale": scale, "zero": zero}
        data["recent"] = recent.contiguous()
        params = {"bits": self.bits, "axis": self.axis, "group_size": self.group_size, "split": n}
        return QuantizedTensor(self.name, tuple(x.shape), x.dtype, data, params)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        check_quantized(q, self.name, ("recent",))
        bits, n, gsz = int(q.params["bits"]), int(q.params["split"]), int(q.params["group_size"])
        *lead, t, d = q.shape
        recent = q.data["recent"]
        if n == 0:
            return recent.to(q.dtype)
        if "codes" not in q.data:
            raise SeqkvError("kivi: quantized tensor lacks ['codes']")
        axis = q.params["axis"]
        codes = q.data["codes"]
        m = gsz if axis == "channel" else min(gsz, d)
        rows = codes.shape[-2] * gsz if axis == "channel" else codes.shape[-3]
        if (
            codes.dtype != torch.uint8
            or codes.shape[-1] != packing.packed_row_bytes(m, bits)
            or (rows != n)
        ):
            raise SeqkvError("kivi: packed codes do not match the tensor's shape and bit width")
        static = {"bits": bits, "axis": axis, "group_size": gsz, "out_dtype": q.dtype}
        args = (codes, q.data["scale"], q.data["zero"], recent)
        return jit.run(_decode, self.compile, args, static)


def _encode(body: torch.Tensor, *, bits: int, axis: str, group_size: int, scale_dtype):
    """Kernel: (..., n, d) -> packed codes, scale and zero point per group."""
    *lead, n, d = body.shape
    b = body.float()
    if axis == "channel":
        # (..., n, d) -> (..., d, n/G, G): groups run along tokens within each channel.
        g = b.transpose(-1, -2).reshape(*lead, d, n // group_size, group_size)
    else:
        gs = min(group_size, d)
        pad = -d % gs
        if pad:  # edge-pad the last channel group so it does not widen the range
            b = torch.nn.functional.pad(b, (0, pad), mode="replicate")
        g = b.reshape(*lead, n, (d + pad) // gs, gs)
    lo = g.amin(dim=-1, keepdim=True)
    hi = g.amax(dim=-1, keepdim=True)
    levels = (1 << bits) - 1
    # Round scale/zero to their stored dtype first so decoding uses exactly what is stored.
    lo = lo.to(scale_dtype)
    scale = ((hi - lo.float()) / levels).to(scale_dtype)
    s = scale.float().clamp_min(1e-30)
    codes = ((g - lo.float()) / s).round().clamp(0, levels).to(torch.uint8)
    return packing.pack(codes, bits), scale.squeeze(-1), lo.squeeze(-1)


def _decode(codes, scale, zero, recent, *, bits: int, axis: str, group_size: int, out_dtype):
    """Kernel: packed groups plus the full-precision window -> (..., T, d) in out_dtype."""
    *lead, _, d = recent.shape
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    if axis == "channel":
        n = codes.shape[-2] * group_size
        vals = packing.unpack(codes, bits, group_size).float() * s + z
        body = vals.reshape(*lead, d, n).transpose(-1, -2)
    else:
        n = codes.shape[-3]
        vals = packing.unpack(codes, bits, min(group_size, d)).float() * s + z
        body = vals.reshape(*lead, n, -1)[..., :d]
    return torch.cat([body.to(out_dtype), recent.to(out_dtype)], dim=-2)
