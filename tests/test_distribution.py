import constriction
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqkv.core.distribution import (
    TOTAL,
    full_weights,
    quantized_pmf,
    reduced_weights,
    symbol_intervals,
)

logits_st = st.integers(2, 400).flatmap(
    lambda v: st.tuples(st.just(v), st.integers(0, 2**31 - 1), st.floats(0.1, 30.0))
)


def _logits(vocab: int, seed: int, scale: float, rows: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((rows, vocab), generator=g) * scale


@given(logits_st)
@settings(max_examples=60, deadline=None)
def test_pmf_is_exact_fixed_point(params):
    vocab, seed, scale = params
    pmf = quantized_pmf(_logits(vocab, seed, scale))
    assert pmf.shape[-1] == vocab + 2
    assert torch.all(pmf.sum(-1) == TOTAL)
    assert torch.all(pmf >= 1)
    # The dummy symbols at both ends are never more than the minimum.
    assert torch.all(pmf[:, 0] == 1) and torch.all(pmf[:, -1] == 1)


def test_pmf_follows_probabilities():
    logits = torch.tensor([[0.0, 5.0, 0.0, -20.0]])
    pmf = quantized_pmf(logits)[0, 1:-1].double() / TOTAL
    probs = torch.softmax(logits.double(), -1)[0]
    assert torch.allclose(pmf, probs, atol=1e-5)


@given(logits_st, st.integers(1, 60))
@settings(max_examples=40, deadline=None)
def test_reduced_model_codes_exactly_like_full_model(params, n):
    """Coding (start, freq) under a 3-symbol model gives the full model's bitstream."""
    vocab, seed, scale = params
    logits = _logits(vocab, seed, scale, rows=n)
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, vocab, (n,), generator=g)
    pmf = quantized_pmf(logits)
    start, freq = symbol_intervals(pmf, tokens)
    cat = constriction.stream.model.Categorical
    full = constriction.stream.stack.AnsCoder()
    full.encode_reverse(
        (tokens + 1).numpy().astype(np.int32), cat(perfect=False),
        np.stack([full_weights(r) for r in pmf.numpy()]),
    )
    reduced = constriction.stream.stack.AnsCoder()
    reduced.encode_reverse(
        np.ones(n, dtype=np.int32), cat(perfect=False), reduced_weights(start.numpy(), freq.numpy())
    )
    assert np.array_equal(full.get_compressed(), reduced.get_compressed())
    decoder = constriction.stream.stack.AnsCoder(reduced.get_compressed())
    decoded = [decoder.decode(cat(full_weights(r), perfect=False)) - 1 for r in pmf.numpy()]
    assert decoded == tokens.tolist()


def test_intervals_tile_the_range():
    pmf = quantized_pmf(torch.randn(1, 50)).expand(50, -1)
    start, freq = symbol_intervals(pmf, torch.arange(50))
    start, freq = start.unsqueeze(0), freq.unsqueeze(0)
    assert int(start[0, 0]) == 1  # after the leading dummy
    assert torch.equal(start[0, 1:], (start + freq)[0, :-1])
    assert int((start + freq)[0, -1]) == TOTAL - 1
