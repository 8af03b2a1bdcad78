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

from ..errors import SeqkvError
from . import packing
from .base import QuantizedTensor, check_input, check_quantized


@dataclass(frozen=True)
class KIVI:
    """KIVI (arXiv 2402.02750): ``axis="channel"`` for keys, ``axis="token"`` for values.

    Stores bit-packed codes, a ``scale_dtype`` scale and zero point per group, and the
    full-precision window in the input dtype; all of it is counted in ``.bits``.
    """

    bits: int = 2
    axis: Literal["channel", "token"] = "token"
    group_size: int = 32
    residual: int = 0
    scale_dtype: torch.dtype = torch.float16
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

    @property
    def token_block(self) -> int:
        """Tokens a cache must gather before quantizing (keys: a whole group along tokens)."""
        return self.group_size if self.axis == "channel" else 1

    def _split_point(self, t: int) -> int:
        n = max(t - self.residual, 0)
        return n - n % self.group_size if self.axis == "channel" else n

    def _quant_groups(self, g: torch.Tensor) -> dict[str, torch.Tensor]:
        """Asymmetric uniform quantization of the last axis of g (the groups)."""
        lo = g.amin(dim=-1, keepdim=True)
        hi = g.amax(dim=-1, keepdim=True)
        levels = (1 << self.bits) - 1
        # Round scale/zero to their stored dtype first so decoding uses exactly what is stored.
        lo = lo.to(self.scale_dtype)
        scale = ((hi - lo.float()) / levels).to(self.scale_dtype)
        s = scale.float().clamp_min(1e-30)
        codes = ((g - lo.float()) / s).round_().clamp_(0, levels).to(torch.uint8)
        return {
            "codes": packing.pack(codes, self.bits),
            "scale": scale.squeeze(-1),
            "zero": lo.squeeze(-1),
        }

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        check_input(x, self.name, min_dims=2)
        t, d = x.shape[-2], x.shape[-1]
        n = self._split_point(t)
        body, recent = x[..., :n, :].float(), x[..., n:, :]
        lead = x.shape[:-2]
        if self.axis == "channel":
            # (..., n, d) -> (..., d, n/G, G): groups run along tokens within each channel.
            g = body.transpose(-1, -2).reshape(*lead, d, n // self.group_size, self.group_size)
        else:
            gs = min(self.group_size, d)
            pad = -d % gs
            if pad:  # edge-pad the last channel group so it does not widen the range
                body = torch.nn.functional.pad(body, (0, pad), mode="replicate") if n else body
            g = body.reshape(*lead, n, (d + pad) // gs, gs)
        data = self._quant_groups(g) if n else {}
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
        scale, zero = q.data["scale"].float().unsqueeze(-1), q.data["zero"].float().unsqueeze(-1)
        if q.params["axis"] == "channel":
            codes = packing.unpack(q.data["codes"], bits, gsz).float()
            body = (codes * scale + zero).reshape(*lead, d, n).transpose(-1, -2)
        else:
            gs = min(gsz, d)
            codes = packing.unpack(q.data["codes"], bits, gs).float()
            body = (codes * scale + zero).reshape(*lead, n, -1)[..., :d]
        return torch.cat([body.to(q.dtype), recent.to(q.dtype)], dim=-2)
