"""Integration on the real embedded model (SmolLM2-135M) and real text."""

import pytest
import torch

from seqkv import compress_cache, compress_text, decompress_text, inspect_blob, restore_cache
from seqkv.core.cache import prefill_cache
from seqkv.demo import bundled_text, caches_equal, greedy_continue, run_one

pytestmark = pytest.mark.slow

NEWS = bundled_text("brown_news")[:200]


def test_text_round_trip_and_size(smollm2):
    blob = compress_text(smollm2, NEWS)
    assert decompress_text(smollm2, blob) == NEWS
    info = inspect_blob(blob)
    assert info["model"] == "smollm2-135m"
    # Real English under a real model: a few bits per token, not 15.6 (log2 of the vocab).
    assert 2.0 < info["bits_per_token"] < 9.0
    assert info["fp16_kv_bits"] == info["tokens"] * 23040 * 8
    assert info["turboquant3_kv_bits"] == info["tokens"] * 30 * 3 * 2 * (64 * 3 + 16)


def test_cache_restores_bit_for_bit_and_generation_continues_exactly(smollm2):
    ids = smollm2.tokenizer(NEWS).input_ids
    original = prefill_cache(smollm2.model, ids)
    blob = compress_cache(smollm2, original.cache, original.input_ids)
    restored = restore_cache(smollm2, blob)
    assert restored.input_ids[0].tolist() == ids
    assert caches_equal(restored.cache, original.cache)
    assert greedy_continue(smollm2.model, restored, 12) == greedy_continue(
        smollm2.model, original, 12
    )


def test_bytes_the_tokenizer_cannot_reproduce(smollm2):
    text = (
        "tabs\tand  double  spaces,\u00a0nbsp, e\u0301 vs \u00e9, \r\nCRLF, \ufeffBOM, "
        "\U0001f600.\n"
    )
    blob = compress_text(smollm2, text)
    assert decompress_text(smollm2, blob) == text


def test_demo_row_verifies_everything(smollm2):
    row = run_one(smollm2, "python", bundled_text("python_tutorial")[:120], continue_tokens=4)
    assert row.text_exact and row.cache_exact and row.continuation_exact
    assert row.ratio_vs_fp16 > 1000


def test_restore_onto_another_model_copy(smollm2):
    """Decode tokens with one copy, prefill on another (as on a GPU): same tensors."""
    import copy

    target = copy.deepcopy(smollm2.model)
    blob = compress_text(smollm2, NEWS[:80])
    restored = restore_cache(smollm2, blob, target=target)
    ref = prefill_cache(smollm2.model, restored.input_ids[0].tolist())
    assert caches_equal(restored.cache, ref.cache)
    # Two copies of one float model may take different CPU kernels (alignment): the ids and
    # cache are exact, float logits are only as close as float kernels make them.
    assert torch.allclose(restored.next_logits, ref.next_logits, atol=1e-4)


def test_gemma3_real_model_round_trip(gemma3_real):
    """A second real architecture: Gemma-3-270M (BOS required, 262k vocabulary, sliding-window
    layers; sequences past its 512-token window are covered by the random-config Gemma-3)."""
    text = "The jury praised the city for the manner in which the election was conducted."
    blob = compress_text(gemma3_real, text)
    assert decompress_text(gemma3_real, blob) == text
    info = inspect_blob(blob)
    assert info["model"] == "gemma3-270m" and 1.0 < info["bits_per_token"] < 12.0
    ids = gemma3_real.tokenizer(text).input_ids
    assert ids[0] == gemma3_real.tokenizer.bos_token_id
    original = prefill_cache(gemma3_real.model, ids)
    restored = restore_cache(gemma3_real, compress_cache(gemma3_real, original.cache, ids))
    assert caches_equal(restored.cache, original.cache)
    assert greedy_continue(gemma3_real.model, restored, 6) == greedy_continue(
        gemma3_real.model, original, 6
    )
