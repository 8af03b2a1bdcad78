"""QuantizedKVCache: a model generates from a quantized cache; storage bits are exact."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from seqkv.core.errors import SeqkvError
from seqkv.core.stepper import cache_kwarg
from seqkv.quant import get_kv_quantizer
from seqkv.quant.cache import QuantizedKVCache


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    "name,kb,vb,window",
    [
        ("turboquant-mse", 4, 2, 0),
        ("turboquant-prod", 3, 3, 0),
        ("kivi", 2, 2, 4),
        ("fp8", None, None, 0),
    ],
)
def test_generate_from_quantized_cache(model, name, kb, vb, window):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    extra = {"group_size": 4} if name == "kivi" else {}  # whole key groups within 17 tokens
    kv = get_kv_quantizer(name, kb, vb, **extra)
    cache = QuantizedKVCache.for_model(model, kv, residual_length=window)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=mask,
                         **{cache_kwarg(model): cache})
    assert out.shape == (2, 18)
    layer = cache.layers[0]
    assert layer.keys.shape == (2, 2, 17, 16)  # the last generated token is never fed back
    # what attention read is what was stored: the quantized part decodes to the mirror
    n = layer.quantized_positions
    assert n > 0 and n == sum(qk.shape[-2] for qk, _ in layer.chunks)
    assert n == 17 - window - (17 - window) % (4 if name == "kivi" else 1)
    k = torch.cat([layer.key_quantizer.dequantize(qk) for qk, _ in layer.chunks], dim=-2)
    assert torch.equal(k, layer.keys[..., :n, :])
    # stored: the quantized chunks, plus the full-precision (fp32) window after them, K and V
    assert cache.storage_bits() == sum(
        qk.bits + qv.bits for lay in cache.layers for qk, qv in lay.chunks
    ) + sum(2 * lay.keys[..., lay.quantized_positions:, :].numel() * 32 for lay in cache.layers)


def test_quantized_cache_changes_logits_and_int8_barely(model):
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    kw = cache_kwarg(model)  # transformers 5.17 names it past_key_values, 5.24 cache
    ref = model(ids, **{kw: DynamicCache(config=model.config)}).logits
    tq1 = model(
        ids, **{kw: QuantizedKVCache.for_model(model, get_kv_quantizer("turboquant-mse", 1, 1))}
    ).logits
    i8 = model(ids, **{kw: QuantizedKVCache.for_model(model, get_kv_quantizer("int8"))}).logits
    assert (tq1 - ref).abs().max() > 10 * (i8 - ref).abs().max()
    assert (i8 - ref).abs().max() < 1e-2


def test_cache_rejects_bad_config():
    with pytest.raises(SeqkvError):
        QuantizedKVCache(get_kv_quantizer("fp8"), num_layers=0)
