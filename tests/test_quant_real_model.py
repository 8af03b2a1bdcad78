"""One short check on the real model: a 4-bit TurboQuant cache barely moves SmolLM2's loss."""

from __future__ import annotations

import pytest
import torch

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters."
)


@pytest.mark.slow
def test_turboquant_cache_on_smollm2():
    from transformers import DynamicCache

    from seqkv.core.models import load_model
    from seqkv.core.stepper import cache_kwarg
    from seqkv.quant import get_kv_quantizer
    from seqkv.quant.cache import QuantizedKVCache

    lm = load_model()
    kw = cache_kwarg(lm.model)
    ids = lm.tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = lm.model(ids, labels=ids, **{kw: DynamicCache(config=lm.model.config)}).loss
        c4 = QuantizedKVCache.for_model(lm.model, get_kv_quantizer("turboquant-mse", 4, 4))
        q4 = lm.model(ids, labels=ids, **{kw: c4}).loss
        c1 = QuantizedKVCache.for_model(lm.model, get_kv_quantizer("turboquant-mse", 1, 1))
        q1 = lm.model(ids, labels=ids, **{kw: c1}).loss
    assert abs(float(q4) - float(ref)) < 0.1 < float(q1) - float(ref)
    assert c4.storage_bits() < c1.storage_bits() * 4
