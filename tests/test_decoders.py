"""The vectorized rANS decoder reads constriction's bitstream exactly (CPU here, GPU there)."""

import constriction
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqkv import compress_tokens, decompress_tokens, inspect_blob
from seqkv.core.decoders import ConstrictionDecoder, VectorRansDecoder
from seqkv.core.distribution import full_weights, quantized_pmf
from seqkv.core.errors import BlobError
from seqkv.core.stepper import PROCEDURE as LOCKSTEP
from seqkv.tokens.codec import TokenCodec


def _encode(pmfs: np.ndarray, symbols: np.ndarray) -> np.ndarray:
    coder = constriction.stream.stack.AnsCoder()
    if len(symbols):
        coder.encode_reverse(
            symbols.astype(np.int32), constriction.stream.model.Categorical(perfect=False),
            np.stack([full_weights(r) for r in pmfs]),
        )
    return coder.get_compressed().astype(np.uint32)


@given(
    n_streams=st.integers(1, 5),
    length=st.integers(1, 40),
    vocab=st.integers(2, 300),
    scale=st.floats(0.0, 40.0),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=40, deadline=None)
def test_vector_decoder_matches_constriction(n_streams, length, vocab, scale, seed):
    g = torch.Generator().manual_seed(seed)
    pmfs = quantized_pmf(torch.randn((length, n_streams, vocab), generator=g) * scale)
    lengths = torch.randint(1, length + 1, (n_streams,), generator=g)
    symbols = torch.stack([
        torch.multinomial(pmfs[t, :, 1:-1].double(), 1, generator=g).squeeze(1) + 1
        for t in range(length)
    ])  # [T, B], never the reserved symbols
    words = [
        _encode(pmfs[: lengths[b], b].numpy(), symbols[: lengths[b], b].numpy())
        for b in range(n_streams)
    ]
    vector = VectorRansDecoder(words, torch.device("cpu"))
    reference = ConstrictionDecoder(words, torch.device("cpu"))
    for t in range(length):
        active = (lengths > t).tolist()
        got = vector.step(pmfs[t], active)
        want = reference.step(pmfs[t], active)
        mask = torch.tensor(active)
        assert torch.equal(got[mask], want[mask])
        assert torch.equal(got[mask], symbols[t][mask] - 1)
    vector.finish()
    reference.finish()


def test_vector_decoder_decodes_inside_a_wider_one():
    """A decode group wider than its decode (more rows, longer word rows) takes a decoder's
    streams into its first rows, idles empty streams in the others, and hands the states
    back: the same symbols as the decoder itself, which then ends clean."""
    g = torch.Generator().manual_seed(3)
    pmfs = quantized_pmf(torch.randn((30, 2, 50), generator=g) * 8.0)
    symbols = torch.stack([torch.multinomial(pmfs[t, :, 1:-1].double(), 1,
                                             generator=g).squeeze(1) + 1 for t in range(30)])
    words = [_encode(pmfs[:, b].numpy(), symbols[:, b].numpy()) for b in range(2)]
    own = VectorRansDecoder(words, torch.device("cpu"))
    wide = VectorRansDecoder([np.ones(64, dtype=np.uint32)] * 4, torch.device("cpu"))
    wide.copy_(own)
    assert not wide.state[2:].any() and not wide.left[2:].any()
    for t in range(30):
        got = wide.step(torch.cat([pmfs[t], pmfs[t]]), [True, True, False, False])
        assert torch.equal(got[:2], symbols[t] - 1)
    own.copy_state_(wide)
    own.finish()
    with pytest.raises(BlobError):  # a stream cut short still shows
        short = VectorRansDecoder(words, torch.device("cpu"))
        wide.copy_(short)
        wide.step(pmfs[0].repeat(2, 1), [True, True, False, False])
        short.copy_state_(wide)
        short.finish()


def test_vector_decoder_in_the_codec(llama):
    ids = list(range(5, 95))
    coding = TokenCodec(llama, chunk_size=25, batch=3, coder="ans").encode(ids)
    codec = TokenCodec(llama, chunk_size=25, batch=3, decoder=VectorRansDecoder, coder="ans")
    assert codec.decode(coding.chunks) == ids


@pytest.mark.parametrize("coder", ["range", "ans"])
def test_both_coders_round_trip(llama, coder):
    ids = list(range(5, 95))
    blob = compress_tokens(llama, ids, chunk_size=40, coder=coder, procedure=LOCKSTEP)
    assert inspect_blob(blob)["coder"] == coder
    assert decompress_tokens(llama, blob) == ids


def test_range_coder_flushes_less_than_ans(llama):
    """Why the CPU default is the range coder: less per-stream flush, same model bits."""
    g = torch.Generator().manual_seed(9)
    texts = [torch.randint(0, 320, (int(n),), generator=g).tolist()
             for n in torch.randint(5, 60, (24,), generator=g)]
    sizes = {c: sum(inspect_blob(compress_tokens(llama, ids, coder=c, procedure=LOCKSTEP))["bits"]
                     for ids in texts)
             for c in ("range", "ans")}
    # Whole 32-bit words hide it per stream; over many streams ~16 bits each show.
    assert sizes["range"] + 24 * 8 < sizes["ans"]


def test_vector_decoder_refuses_range_streams():
    with pytest.raises(BlobError):
        VectorRansDecoder([np.zeros(2, dtype=np.uint32)], torch.device("cpu"), coder="range")


def test_leftover_data_detected(llama):
    coding = TokenCodec(llama, chunk_size=50, coder="ans").encode(list(range(3, 40)))
    chunk = coding.chunks[0]
    chunk.words = np.concatenate([np.array([12345], dtype=np.uint32), chunk.words])
    for decoder in (ConstrictionDecoder, VectorRansDecoder):
        with pytest.raises(BlobError):
            TokenCodec(llama, chunk_size=50, decoder=decoder, coder="ans").decode(coding.chunks)
