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
from .jit import CompileMode, check_mode, run

_E4M3_MAX = 448.0


def _fp8_encode(x: torch.Tensor, *, per_vector: bool):
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if per_vector else xf.abs().amax()
    s = (amax / _E4M3_MAX).clamp_min(1e-30)
    return (xf / s).to(torch.float8_e4m3fn), (s.squeeze(-1) if per_vector else s.reshape(()))


def _fp8_decode(codes: torch.Tensor, scale: torch.Tensor, *, out_dtype: torch.dtype):
    s = scale if scale.dim() == 0 else scale.unsqueeze(-1)
    return (codes.float() * s).to(out_dtype)


def _int8_encode(x: torch.Tensor):
    xf = x.float()
    s = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(1e-30)
    return (xf / s).round().clamp(-127, 127).to(torch.int8), s.squeeze(-1)


def _int8_decode(codes: torch.Tensor, scale: torch.Tensor, *, out_dtype: torch.dtype):
    return (codes.float() * scale.unsqueeze(-1)).to(out_dtype)


@dataclass(frozen=True)
class FP8:
    """FP8 E4M3 with a per-tensor (default) or per-vector float32 scale (arXiv 2209.05433).

    ``compile``: see :mod:`seqkv.quant.jit` ("auto": torch.compile on CUDA, eager on the CPU).
    """

    scale: Literal["tensor", "vector"] = "tensor"
    bits: int = 8
    compile: CompileMode = "auto"
    name: ClassVar[str] = "fp8"

    def __post_init__(self) -> None:
        check_mode(self.compile)

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        check_input(x, self.name)
        static = {"per_vector": self.scale == "vector"}
        codes, scale = run(_fp8_encode, self.compile, (x,), static)
        data = {"codes": codes, "scale": scale}
        return QuantizedTensor(self.name, tuple(x.shape), x.dtype, data, {"scale": self.scale})

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        check_quantized(q, self.name, ("codes", "scale"))
        args = (q.data["codes"], q.data["scale"])
        return run(_fp8_decode, self.compile, args, {"out_dtype": q.dtype}).reshape(q.shape)


@dataclass(frozen=True)
class Int8:
    """Symmetric int8 with one float32 absmax scale per vector (arXiv 2208.07339).

    ``compile``: see :mod:`seqkv.quant.jit` ("auto": torch.compile on CUDA, eager on the CPU).
    """

    bits: int = 8
    compile: CompileMode = "auto"
    name: ClassVar[str] = "int8"

    def __post_init__(self) -> None:
        check_mode(self.compile)

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        check_input(x, self.name)
        codes, s = run(_int8_encode, self.compile, (x,), {})
        return QuantizedTensor(self.name, tuple(x.shape), x.dtype, {"codes": codes, "scale": s})

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        check_quantized(q, self.name, ("codes", "scale"))
        args = (q.data["codes"], q.data["scale"])
        return run(_int8_decode, self.compile, args, {"out_dtype": q.dtype}).reshape(q.shape)
