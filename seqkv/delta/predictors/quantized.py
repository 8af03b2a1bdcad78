"""A per-vector quantized copy of the cache (seqkv.quant), stored as side information."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.cache import KVCache
from ...core.errors import BlobError
from ...core.models import LoadedModel
from ...quant import QuantizedTensor, get_quantizer
from ..residual_coding import VarintReader, put_varints
from .base import Layout, Predictor, check_layout


@dataclass
class QuantizedCopy(Predictor):
    """A per-vector quantized copy of the cache (seqkv.quant), stored as side information:
    no model compute, but its bits are charged to the residual part."""

    name = "quantized"
    method: str = "int8"
    bits: float | None = None

    def _quantizer(self):
        return get_quantizer(self.method, self.bits)

    def side_info(self, kv: KVCache, lm: LoadedModel | None) -> bytes:
        q, out = self._quantizer(), bytearray()
        for t in kv.tensors:
            x = torch.nan_to_num(t.detach().cpu().float(), nan=0.0, posinf=0.0, neginf=0.0)
            data = q.quantize(x).to_bytes() if x.numel() else b""
            put_varints([len(data)], out)
            out += data
        return bytes(out)

    def predict(self, lm, ids, side: bytes, layout: Layout) -> list[torch.Tensor]:
        q, reader, pred = self._quantizer(), VarintReader(side), []
        for shape, dtype in layout:
            n = reader.read()
            if reader.pos + n > len(side):
                raise BlobError("corrupt kv-delta blob (quantized copy)")
            data = side[reader.pos:reader.pos + n]
            reader.pos += n
            if not n:
                pred.append(torch.zeros(shape, dtype=dtype))
                continue
            pred.append(q.dequantize(QuantizedTensor.from_bytes(data)).reshape(shape))
        if reader.pos != len(side):
            raise BlobError("corrupt kv-delta blob (quantized copy length)")
        return check_layout(pred, layout, self.name)
