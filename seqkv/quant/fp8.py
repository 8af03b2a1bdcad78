"""Baselines: FP8 (e4m3) and int8 per-vector KV quantization.

FP8 E4M3 follows Micikevicius et al., "FP8 Formats for Deep Learning" (arXiv 2209.05433), as
used for KV caches by vLLM and TensorRT-LLM: one float32 scale mapping the tensor's absolute
maximum to 448, then a cast. Int8 is symmetric absmax per vector with a float32 scale
(the LLM.int8()-style vector-wise scheme, arXiv 2208.07339).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from .base import QuantizedTensor, check_input, check_quantized

_E4M3_MAX = 448.0


@dataclass(frozen=True)
class FP8:
    """FP8 E4M3 with a per-tensor (default) or per-vector float32 scale (arXiv 2209.05433)."""

    scale: Literal["tensor", "vector"] = "tensor"
    bits: int = 8
    name: ClassVar[str] = "fp8"

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        check_input(x, self.name)
        xf = x.float()
        amax = xf.abs().amax() if self.scale == "tensor" else xf.abs().amax(dim=-1, keepdim=True)
        s = (amax / _E4M3_MAX).clamp_min(1e-30)
        codes = (xf / s).to(torch.float8_e4m3fn)
        scale = s.reshape(()) if self.scale == "tensor" else s.squeeze(-1)
        data = {"codes": codes, "scale": scale.float()}
        return QuantizedTensor(self.name, tuple(x.shape), x.dtype, data, {"scale": self.scale})

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        check_quantized(q, self.name, ("codes", "scale"))
        s = q.data["scale"]
        s = s if s.dim() == 0 else s.unsqueeze(-1)
        return (q.data["codes"].float() * s).to(q.dtype).reshape(q.shape)


@dataclass(frozen=True)
class Int8:
    """Symmetric int8 with one float32 absmax scale per vector (arXiv 2208.07339)."""

    bits: int = 8
    name: ClassVar[str] = "int8"

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        check_input(x, self.name)
        xf = x.float()
        s = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(1e-30)
        codes = (xf / s).round_().clamp_(-127, 127).to(torch.int8)
        return QuantizedTensor(
            self.name, tuple(x.shape), x.dtype, {"codes": codes, "scale": s.squeeze(-1)}
        )

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        check_quantized(q, self.name, ("codes", "scale"))
        return (
            (q.data["codes"].float() * q.data["scale"].unsqueeze(-1)).to(q.dtype).reshape(q.shape)
        )
