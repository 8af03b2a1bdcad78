"""Token tier round trips on random-config models: exact ids, chunks, windows, edge cases.

compress_tokens codes under the integer engine for these architectures; TokenCodec is the HF
lockstep procedure, the fallback for the others."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqkv import compress_tokens, decompress_tokens, inspect_blob
from seqkv.core.errors import SeqkvError
from seqkv.tokens import compact
from seqkv.tokens.codec import TokenCodec, split_chunks

from .conftest import tiny_llama


@given(
    ids=st.lists(st.integers(0, 319), min_size=1, max_size=40),
    chunk=st.integers(1, 16),
    batch=st.integers(1, 4),
)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_round_trip_any_ids(llama, ids, chunk, batch):
    blob = compress_tokens(llama, ids, chunk_size=chunk, batch=batch)
    assert decompress_tokens(llama, blob) == ids
    header, _ = compact.unpack(blob)
    assert header.chunk_lengths == [b - a for a, b in split_chunks(len(ids), chunk)]


def test_one_token(llama):
    blob = compress_tokens(llama, [7])
    assert decompress_tokens(llama, blob) == [7]
    assert inspect_blob(blob)["tokens"] == 1


def test_zero_tokens_refused(llama):
    with pytest.raises(SeqkvError, match="zero tokens"):
        compress_tokens(llama, [])


def test_out_of_vocabulary_refused(llama):
    with pytest.raises(SeqkvError, match="out of range"):
        compress_tokens(llama, [1, 320])


def test_longer_than_context_window():
    """A sequence 5x the context window is cut into chunks that each fit it."""
    lm = tiny_llama(max_pos=32)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 320, (160,), generator=g).tolist()
    codec = TokenCodec(lm, chunk_size=1024, batch=3)
    assert codec.chunk_size == 31  # position 0 holds the prime token
    coding = codec.encode(ids)
    assert len(coding.chunks) == 6 and max(c.n_tokens for c in coding.chunks) <= 31
    assert codec.decode(coding.chunks) == ids
    blob = compress_tokens(lm, ids, chunk_size=1024)
    assert inspect_blob(blob)["chunks"] == 6 and inspect_blob(blob)["chunk_size"] == 31
    assert decompress_tokens(lm, blob) == ids


def test_sliding_window_model_past_its_window(gemma3):
    """Gemma-3-style sliding layers (window 8) on sequences well past the window."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 300, (70,), generator=g).tolist()
    blob = compress_tokens(gemma3, ids, chunk_size=30, batch=2)
    assert decompress_tokens(gemma3, blob) == ids


def test_predictable_sequence_codes_below_uniform():
    """Bits follow the model: a sequence the model predicts costs far less than a random one."""
    llama = tiny_llama(seed=2)
    with torch.no_grad():
        llama.model.lm_head.weight.mul_(40)  # a confident model, unlike a fresh random one
    greedy = [1]
    with torch.inference_mode():
        for _ in range(60):
            logits = llama.model(torch.tensor([greedy])).logits[0, -1]
            greedy.append(int(logits.argmax()))
    g = torch.Generator().manual_seed(5)
    random_ids = torch.randint(0, 320, (60,), generator=g).tolist()
    predicted = inspect_blob(compress_tokens(llama, greedy[1:]))["bits"]
    unpredicted = inspect_blob(compress_tokens(llama, random_ids))["bits"]
    assert predicted < unpredicted / 2


def test_coded_bits_track_model_cross_entropy():
    """The engine's integers cost almost nothing over the float model's own cross-entropy."""
    llama = tiny_llama(max_pos=2048)
    with torch.no_grad():
        llama.model.lm_head.weight.mul_(20)  # a peaked model, so the bits are not all noise
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 320, (2000,), generator=g).tolist()
    info = inspect_blob(compress_tokens(llama, ids, chunk_size=1000))
    assert info["chunks"] == 2
    model_bits = 0.0
    with torch.inference_mode():
        for chunk in (ids[:1000], ids[1000:]):
            inputs = torch.tensor([[llama.prime_token(), *chunk[:-1]]])
            logp = torch.log_softmax(llama.model(inputs).logits[0].double(), -1)
            model_bits -= float(logp[torch.arange(1000), torch.tensor(chunk)].sum())
    model_bits /= math.log(2)
    flush = 2 * 64
    assert model_bits * 0.99 < info["bits"] < model_bits * 1.01 + flush


def test_unknown_procedure_refused(llama):
    with pytest.raises(SeqkvError, match="unknown coding procedure"):
        compress_tokens(llama, [1, 2], procedure="nope")
