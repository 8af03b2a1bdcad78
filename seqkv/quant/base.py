"""The narrow interface every per-vector quantizer shares, and the tensor they produce.

A quantizer is a small dataclass with ``quantize(x) -> QuantizedTensor`` and
``dequantize(q) -> Tensor``. A :class:`QuantizedTensor` holds everything that would be
stored (packed codes, norms, scales, full-precision windows) as named tensors, plus the
per-tensor header fields the decoder needs (seed, bit widths). ``.bits`` is the exact
storage cost: every stored tensor at its real element width, plus the header fields that
carry information (64 bits per seed). The original shape and dtype are container metadata
shared by every method (and by the raw baseline), so they are not charged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from ..core.errors import BlobError, SeqkvError

SEED_BITS = 64  # a stored seed is one uint64


@dataclass
class QuantizedTensor:
    """Packed codes and side information of one quantized tensor, with its true storage cost."""

    method: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    data: dict[str, torch.Tensor]
    params: dict[str, int | float | str] = field(default_factory=dict)
    header_bits: int = 0  # bits of ``params`` that are real per-tensor storage (seeds)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def bits(self) -> int:
        """Exact stored bits: every data tensor at its element width, plus the header."""
        payload = sum(t.numel() * t.element_size() * 8 for t in self.data.values())
        return payload + self.header_bits

    @property
    def bits_per_component(self) -> float:
        return self.bits / max(self.numel, 1)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        data = {k: v.to(device) for k, v in self.data.items()}
        return QuantizedTensor(
            self.method, self.shape, self.dtype, data, dict(self.params), self.header_bits
        )

    def to_bytes(self) -> bytes:
        """Serialize (safetensors) for a store of materialized checkpoints."""
        from safetensors.torch import save

        meta = {
            "seqkv.quant": json.dumps(
                {
                    "method": self.method,
                    "shape": list(self.shape),
                    "dtype": str(self.dtype).removeprefix("torch."),
                    "params": self.params,
                    "header_bits": self.header_bits,
                }
            )
        }
        return save({k: v.contiguous().cpu() for k, v in self.data.items()}, metadata=meta)

    @classmethod
    def from_bytes(cls, blob: bytes) -> QuantizedTensor:
        from safetensors.torch import load

        try:
            data = load(blob)
            n = int.from_bytes(blob[:8], "little")
            header = json.loads(blob[8 : 8 + n])
            meta = json.loads(header["__metadata__"]["seqkv.quant"])
            dtype = getattr(torch, meta["dtype"])
            if not isinstance(dtype, torch.dtype):
                raise ValueError(meta["dtype"])
            return cls(
                meta["method"],
                tuple(int(s) for s in meta["shape"]),
                dtype,
                data,
                meta["params"],
                int(meta["header_bits"]),
            )
        except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt blob
            raise BlobError(f"not a seqkv quantized tensor ({type(e).__name__}: {e})") from e


@runtime_checkable
class Quantizer(Protocol):
    """What every method implements."""

    name: str

    def quantize(self, x: torch.Tensor) -> QuantizedTensor: ...

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor: ...


def check_input(x: torch.Tensor, name: str, min_dims: int = 1) -> None:
    """Refuse what no quantizer can take: non-tensors, non-float dtypes, empty vectors."""
    if not isinstance(x, torch.Tensor):
        raise SeqkvError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise SeqkvError(
            f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {x.dtype}"
        )
    if x.dim() < min_dims or x.shape[-1] == 0:
        raise SeqkvError(f"{name}: expected shape (..., d) with d > 0, got {tuple(x.shape)}")


def check_quantized(q: QuantizedTensor, name: str, required: tuple[str, ...]) -> None:
    """Refuse a QuantizedTensor of another method or with missing parts."""
    if not isinstance(q, QuantizedTensor):
        raise SeqkvError(f"{name}: expected a QuantizedTensor, got {type(q).__name__}")
    if q.method != name:
        raise SeqkvError(f"{name}: cannot decode a {q.method!r} tensor")
    missing = [k for k in required if k not in q.data]
    if missing:
        raise SeqkvError(f"{name}: quantized tensor lacks {missing}")


@dataclass(frozen=True)
class KVQuantizer:
    """A key quantizer and a value quantizer: K and V get separate methods and bit widths."""

    key: Quantizer
    value: Quantizer
