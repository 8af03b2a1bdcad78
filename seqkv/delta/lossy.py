"""Lossy modes: residuals quantized so every restored tensor meets a user bound.

Each mode codes one tensor against its prediction: ``encode(x, pred)`` gives integer
residuals for the entropy coder (or None), a payload of its own, and the reconstruction the
decoder will produce; ``decode(ints, pred, payload)`` reproduces that reconstruction. NaN
and Inf have no residual: both modes store them exactly, by index, as escapes.

- :class:`MaxAbsError`: uniform scalar quantization, q = round((x - pred) / 2E), so every
  value is within E (values the cast back to the stored dtype pushes past E are escapes).
- :class:`RelativeMSE`: the residual vectors (along head_dim) quantized by a per-vector
  quantizer (TurboQuant-mse by default, arXiv 2504.19874) in up to four refinement stages
  of the fewest bits meeting ||x' - x||^2 <= R ||x||^2 per tensor; a tensor the stages cannot
  bring within R (the stored dtype's own rounding) is coded exactly instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.cache import int_view
from ..core.errors import BlobError
from .residual_coding import VarintReader, put_varints

_QMAX = 1 << 40
MAX_STAGES = 4


def _escapes(x: torch.Tensor, bad: torch.Tensor) -> tuple[torch.Tensor, bytes]:
    flat = x.detach().cpu().reshape(-1)
    idx = torch.nonzero(bad.reshape(-1)).reshape(-1)
    out = bytearray()
    put_varints([len(idx)], out)
    out += idx.numpy().astype("<i8").tobytes() + int_view(flat[idx]).numpy().tobytes()
    return idx, bytes(out)


def _apply_escapes(recon: torch.Tensor, reader: VarintReader) -> torch.Tensor:
    n = reader.read()
    width = recon.element_size()
    end = reader.pos + n * (8 + width)
    if end > len(reader.data):
        raise BlobError("corrupt kv-delta blob (escapes)")
    idx = np.frombuffer(reader.data[reader.pos:reader.pos + 8 * n], dtype="<i8")
    if n and (idx.min() < 0 or idx.max() >= recon.numel()):
        raise BlobError("corrupt kv-delta blob (escape index)")
    vals = reader.data[reader.pos + 8 * n:end]
    reader.pos = end
    if n:
        iv = int_view(recon.reshape(-1))
        iv[torch.from_numpy(idx.copy())] = torch.frombuffer(bytearray(vals), dtype=iv.dtype)
    return recon


@dataclass(frozen=True)
class MaxAbsError:
    bound: float
    uses_symbols = True  # its integer residuals go through the entropy coder

    def describe(self) -> dict:
        return {"max_abs_error": self.bound}

    def _recon(self, pred: torch.Tensor, q: np.ndarray) -> torch.Tensor:
        step = torch.tensor(2.0 * self.bound, dtype=torch.float64)
        pf = pred.detach().cpu().to(torch.float64).reshape(-1)
        return (pf + torch.from_numpy(q).to(torch.float64) * step).to(pred.dtype)

    def encode(self, x: torch.Tensor, pred: torch.Tensor):
        xf = x.detach().cpu().to(torch.float64).reshape(-1)
        pf = pred.detach().cpu().to(torch.float64).reshape(-1)
        qf = torch.round((xf - pf) / (2.0 * self.bound))
        ok = torch.isfinite(qf) & (qf.abs() < _QMAX)
        q = torch.where(ok, qf, torch.zeros_like(qf)).to(torch.int64).numpy()
        err = (self._recon(pred, q).to(torch.float64) - xf).abs()
        bad = ~(err <= self.bound)  # NaN error (x or recon not finite) is bad too
        q = np.where(bad.numpy(), 0, q)
        idx, payload = _escapes(x, bad)
        recon = self._recon(pred, q)
        recon[idx] = x.detach().cpu().reshape(-1)[idx]
        return q, payload, recon.reshape(x.shape)

    def decode(self, q: np.ndarray | None, pred: torch.Tensor, payload: bytes) -> torch.Tensor:
        reader = VarintReader(payload)
        recon = _apply_escapes(self._recon(pred, q), reader)
        if reader.pos != len(payload):
            raise BlobError("corrupt kv-delta blob (lossy payload)")
        return recon.reshape(pred.shape)


@dataclass(frozen=True)
class RelativeMSE:
    target: float
    method: str = "turboquant-mse"
    uses_symbols = False  # its payload is the quantizer's codes; None from encode: exact

    def describe(self) -> dict:
        return {"rel_mse": self.target, "method": self.method}

    def _quantizer(self, bits: int, stage: int):
        from ..quant import get_quantizer

        return get_quantizer(self.method, bits, seed=stage)

    def _stage(self, r: torch.Tensor, bits: int, stage: int) -> tuple[bytes, torch.Tensor]:
        q = self._quantizer(bits, stage)
        qt = q.quantize(r)
        payload = b"".join(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
                           for _, t in sorted(qt.data.items()))
        return payload, q.dequantize(qt).float().reshape(r.shape)

    def _unstage(self, data: bytes, shape, bits: int, stage: int) -> torch.Tensor:
        q = self._quantizer(bits, stage)
        qt = q.quantize(torch.zeros(shape))  # the layout of this shape's stored tensors
        pos = 0
        for key, t in sorted(qt.data.items()):
            n = t.numel() * t.element_size()
            if pos + n > len(data):
                raise BlobError("corrupt kv-delta blob (quantized residual)")
            raw = torch.frombuffer(bytearray(data[pos:pos + n]), dtype=torch.uint8)
            qt.data[key] = raw.view(t.dtype).reshape(t.shape)
            pos += n
        if pos != len(data):
            raise BlobError("corrupt kv-delta blob (quantized residual length)")
        return q.dequantize(qt).float().reshape(shape)

    def encode(self, x: torch.Tensor, pred: torch.Tensor):
        xc = x.detach().cpu()
        finite = torch.isfinite(xc.float())
        xf = torch.where(finite, xc.float(), torch.zeros(()))
        budget = self.target * float((xf.double() ** 2).sum())
        idx, escapes = _escapes(xc, ~finite)

        def finish(acc: torch.Tensor) -> tuple[torch.Tensor, float]:
            out = acc.to(x.dtype).reshape(-1)
            out[idx] = xc.reshape(-1)[idx]
            out = out.reshape(x.shape)
            diff = torch.where(finite, out.double() - xf.double(), 0.0)  # escapes are exact
            return out, float(diff.pow(2).sum())

        acc = torch.nan_to_num(pred.detach().cpu().float(), nan=0.0, posinf=0.0, neginf=0.0)
        recon, err = finish(acc)
        stages: list[tuple[int, bytes]] = []
        while err > budget and len(stages) < MAX_STAGES and x.numel():
            r = xf - acc
            for bits in range(1, 5):  # the fewest bits that meet the bound, else 4 and go on
                payload, deq = self._stage(r, bits, len(stages))
                trial, trial_err = finish(acc + deq)
                if trial_err <= budget or bits == 4:
                    break
            stages.append((bits, payload))
            acc, recon, err = acc + deq, trial, trial_err
        if err > budget:  # beyond what the stored dtype can round to: the caller codes it exactly
            return None
        out = bytearray()
        put_varints([len(stages)], out)
        for bits, payload in stages:
            put_varints([bits, len(payload)], out)
            out += payload
        return None, bytes(out) + escapes, recon

    def decode(self, q: np.ndarray | None, pred: torch.Tensor, payload: bytes) -> torch.Tensor:
        reader = VarintReader(payload)
        acc = torch.nan_to_num(pred.detach().cpu().float(), nan=0.0, posinf=0.0, neginf=0.0)
        n = reader.read()
        if n > MAX_STAGES:
            raise BlobError("corrupt kv-delta blob (stages)")
        for stage in range(n):
            bits, size = reader.read(), reader.read()
            if not 1 <= bits <= 4 or reader.pos + size > len(payload):
                raise BlobError("corrupt kv-delta blob (stage header)")
            acc = acc + self._unstage(payload[reader.pos:reader.pos + size], pred.shape, bits,
                                      stage)
            reader.pos += size
        recon = _apply_escapes(acc.to(pred.dtype).reshape(-1), reader)
        if reader.pos != len(payload):
            raise BlobError("corrupt kv-delta blob (lossy payload)")
        return recon.reshape(pred.shape)


def lossy_mode(max_abs_error: float | None = None, rel_mse: float | None = None,
               method: str = "turboquant-mse"):
    """The lossy mode a bound asks for, or None: exact."""
    from ..core.errors import SeqkvError

    if max_abs_error is not None and rel_mse is not None:
        raise SeqkvError("give one bound: max_abs_error or rel_mse")
    for name, v in (("max_abs_error", max_abs_error), ("rel_mse", rel_mse)):
        if v is not None and not (v > 0 and np.isfinite(v)):
            raise SeqkvError(f"{name} must be a positive number, got {v}")
    if max_abs_error is not None:
        return MaxAbsError(float(max_abs_error))
    if rel_mse is not None:
        return RelativeMSE(float(rel_mse), method)
    return None


def mode_from_header(d: dict):
    if "max_abs_error" in d:
        return MaxAbsError(float(d["max_abs_error"]))
    if "rel_mse" in d:
        return RelativeMSE(float(d["rel_mse"]), str(d.get("method", "turboquant-mse")))
    raise BlobError("corrupt kv-delta header (lossy mode)")
