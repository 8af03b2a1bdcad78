"""A transformers Cache that stores K and V through any seqkv quantizer.

Quantize on write, dequantize on read: every token's keys and values are quantized as they
enter the cache (after an optional full-precision recent window, KIVI-style), and attention
reads the dequantized tensors. The quantized chunks are the record of what is stored;
``storage_bits()`` counts them plus the full-precision window. A dequantized mirror is kept
so each decoding step costs one new chunk's dequantization, not the whole history's.

Works with transformers 5.x: ``QuantizedKVCache`` is a ``Cache`` whose ``layers[i]`` are
``DynamicLayer``s, so ``layers[i].keys / .values`` are what the model attends to, and it can
be passed to ``model(...)`` or ``generate`` as ``past_key_values=`` (``cache=`` on the
transformers versions that renamed it; ``seqkv.core.stepper.cache_kwarg(model)`` gives the name).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..core.errors import SeqkvError
from .base import KVQuantizer, QuantizedTensor, Quantizer


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's cache, quantized through a key and a value quantizer."""

    is_croppable = False

    def __init__(self, key: Quantizer, value: Quantizer, residual_length: int = 0):
        super().__init__()
        self.key_quantizer, self.value_quantizer = key, value
        self.residual_length = residual_length
        # Keys quantized per channel need whole token groups (KIVI); per-vector methods take any.
        self.block = max(getattr(key, "token_block", 1), getattr(value, "token_block", 1))
        self.chunks: list[tuple[QuantizedTensor, QuantizedTensor]] = []
        self._dq_k = self._dq_v = None  # dequantized mirror of the chunks
        self._fp_k = self._fp_v = None  # full-precision recent window

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        empty_k, empty_v = key_states[..., :0, :], value_states[..., :0, :]
        self._dq_k, self._dq_v, self._fp_k, self._fp_v = empty_k, empty_v, empty_k, empty_v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._fp_k = torch.cat([self._fp_k, key_states], dim=-2)
        self._fp_v = torch.cat([self._fp_v, value_states], dim=-2)
        excess = self._fp_k.shape[-2] - self.residual_length
        n = excess - excess % self.block if excess > 0 else 0
        if n > 0:
            qk = self.key_quantizer.quantize(self._fp_k[..., :n, :].contiguous())
            qv = self.value_quantizer.quantize(self._fp_v[..., :n, :].contiguous())
            self.chunks.append((qk, qv))
            dk = self.key_quantizer.dequantize(qk).to(key_states.dtype)
            dv = self.value_quantizer.dequantize(qv).to(value_states.dtype)
            self._dq_k = torch.cat([self._dq_k, dk], dim=-2)
            self._dq_v = torch.cat([self._dq_v, dv], dim=-2)
            self._fp_k, self._fp_v = self._fp_k[..., n:, :], self._fp_v[..., n:, :]
        self.keys = torch.cat([self._dq_k, self._fp_k], dim=-2)
        self.values = torch.cat([self._dq_v, self._fp_v], dim=-2)
        return self.keys, self.values

    @property
    def quantized_positions(self) -> int:
        """Positions held quantized; those after them are the full-precision recent window."""
        return sum(k.shape[-2] for k, _ in self.chunks)

    def storage_bits(self) -> int:
        """Bits this layer stores: quantized chunks plus the full-precision window."""
        if not self.is_initialized:
            return 0
        q = sum(k.bits + v.bits for k, v in self.chunks)
        fp = (self._fp_k.numel() * self._fp_k.element_size()) * 8
        return q + fp + self._fp_v.numel() * self._fp_v.element_size() * 8

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise SeqkvError("QuantizedKVCache does not support beam search reordering")

    def reset(self) -> None:
        super().reset()
        self.is_initialized = False
        self.chunks = []


class QuantizedKVCache(Cache):
    """transformers Cache with quantize-on-write, dequantize-on-read K/V for every layer.

    ``QuantizedKVCache(get_kv_quantizer("turboquant-mse", 4, 2), num_layers=cfg.num_hidden_layers)``
    """

    def __init__(self, quantizer: KVQuantizer, num_layers: int, residual_length: int = 0):
        if num_layers < 1:
            raise SeqkvError(f"num_layers must be >= 1, got {num_layers}")
        layers = [
            QuantizedKVLayer(quantizer.key, quantizer.value, residual_length)
            for _ in range(num_layers)
        ]
        super().__init__(layers=layers)

    @classmethod
    def for_model(cls, model, quantizer: KVQuantizer, residual_length: int = 0) -> QuantizedKVCache:
        cfg = (
            model.config.get_text_config()
            if hasattr(model.config, "get_text_config")
            else model.config
        )
        types = getattr(cfg, "layer_types", None)
        if types and any(t != "full_attention" for t in types):
            raise SeqkvError(
                "QuantizedKVCache supports full-attention layers only (no sliding window)"
            )
        return cls(quantizer, cfg.num_hidden_layers, residual_length)

    def storage_bits(self) -> int:
        """Total stored bits over all layers."""
        return sum(layer.storage_bits() for layer in self.layers)
