"""The entropy-coding layer: every constriction stream of the package is made and read here,
by the token tier, the engine, the store and the delta tier's residual coder.

Two bitstreams, both constriction's (24-bit precision, 32-bit words):
- ``range``: its range coder (``queue.RangeEncoder``), ~16 bits of flush per stream; decoded
  on the host by ``ConstrictionDecoder``. The default where the model runs on the CPU.
- ``ans``: its rANS coder (``stack.AnsCoder``, 64-bit state; words form a stack whose top is
  the end of the array), ~32 bits of flush per stream, but its decoder is a handful of integer
  operations per stream: ``VectorRansDecoder`` runs one step for every stream at once on the
  GPU, so decoding never moves a distribution to the host (SmolLM2's 49,152 floats a token would
  be 40 GB/s at 200k tokens/s). The default on accelerators; constriction's decoder of the same
  stream is the reference it is tested against (tests/test_decoders.py).

The residual coder's symbols go through the range coder under categorical models fitted to
their counts (``encode_categorical`` / ``CategoricalDecoder``).
"""

from __future__ import annotations

from collections.abc import Sequence

import constriction
import numpy as np
import torch

from .distribution import PRECISION, full_weights, reduced_weights
from .errors import BlobError

_Categorical = constriction.stream.model.Categorical
_MASK = (1 << PRECISION) - 1
_LOW40 = (1 << (64 - PRECISION)) - 1
_LOW32 = (1 << 32) - 1


def _reserved(symbols: torch.Tensor, n_symbols: int) -> torch.Tensor:
    return (symbols <= 0) | (symbols >= n_symbols - 1)


CODERS = ("range", "ans")


def encode_stream(coder: str, start: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """One stream's words for tokens given by their (start, freq) intervals, in order."""
    ones = np.ones(start.size, dtype=np.int32)
    model = _Categorical(perfect=False)
    if coder == "range":
        encoder = constriction.stream.queue.RangeEncoder()
        encoder.encode(ones, model, reduced_weights(start, freq))
    else:
        encoder = constriction.stream.stack.AnsCoder()
        encoder.encode_reverse(ones, model, reduced_weights(start, freq))
    return encoder.get_compressed().astype(np.uint32)


def decode_one(coder, pmf_row: np.ndarray) -> int:
    """The next symbol of an open rANS or range ``coder`` (``open_decoder``) under one
    quantized distribution [V + 2] on the host; BlobError if the stream cannot give one."""
    try:
        symbol = int(coder.decode(_Categorical(full_weights(pmf_row), perfect=False)))
    except Exception as e:  # constriction raises on exhausted or invalid streams
        raise BlobError(f"corrupt token stream: {e}") from e
    if not 1 <= symbol <= pmf_row.size - 2:
        raise BlobError("corrupt token stream: decoded a reserved symbol")
    return symbol


def open_decoder(coder: str, words: np.ndarray):
    """constriction's decoder of one ``range`` or ``ans`` stream."""
    kind = (constriction.stream.queue.RangeDecoder if coder == "range"
            else constriction.stream.stack.AnsCoder)
    return kind(np.asarray(words, dtype=np.uint32))


def _fitted(counts: np.ndarray):
    probs = counts.astype(np.float64) / float(counts.sum())
    return _Categorical(probs, perfect=False)


def encode_categorical(pieces: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """One range-coded stream of pieces (symbols in [0, len(counts)), counts), each piece's
    symbols under the categorical model of its own counts."""
    encoder = constriction.stream.queue.RangeEncoder()
    for symbols, counts in pieces:
        encoder.encode(np.asarray(symbols, dtype=np.int32), _fitted(counts))
    return encoder.get_compressed().astype(np.uint32)


class CategoricalDecoder:
    """Reads the pieces of ``encode_categorical``'s stream back, in order."""

    def __init__(self, words: np.ndarray) -> None:
        self._decoder = constriction.stream.queue.RangeDecoder(np.asarray(words, np.uint32))

    def decode(self, counts: np.ndarray, n: int) -> np.ndarray:
        return np.asarray(self._decoder.decode(_fitted(counts), n), dtype=np.int64)


class ConstrictionDecoder:
    """One constriction decoder per stream; takes the distribution on the host."""

    def __init__(self, words: Sequence[np.ndarray], device: torch.device,
                 coder: str = "ans") -> None:
        self.coders = [open_decoder(coder, w) for w in words]
        self.coder = coder
        self.device = device

    def step(self, pmf: torch.Tensor, active: torch.Tensor | Sequence[bool]) -> torch.Tensor:
        active = torch.as_tensor(active).tolist()  # host decoders loop in Python anyway
        pmf_np = pmf.cpu().numpy()
        symbols = np.zeros(len(self.coders), dtype=np.int64)
        for row, coder in enumerate(self.coders):
            if active[row]:
                symbols[row] = decode_one(coder, pmf_np[row])
        return torch.from_numpy(symbols - 1).to(self.device)

    def finish(self) -> None:
        # A range decoder cannot always tell its end (constriction's docs); rANS can.
        done = [c.maybe_exhausted() if self.coder == "range" else c.is_empty()
                for c in self.coders]
        if not all(done):
            raise BlobError("corrupt token stream: data left over after the last token")


class VectorRansDecoder:
    """Every stream's rANS state in one int64 tensor, decoded in lockstep on any device.

    int64 holds the unsigned 64-bit state as its two's-complement bit pattern: products wrap
    mod 2**64 exactly as unsigned ones do, and shifts are masked to be logical.
    """

    def __init__(self, words: Sequence[np.ndarray], device: torch.device,
                 coder: str = "ans") -> None:
        if coder != "ans":
            raise BlobError(f"the vectorized decoder reads rANS streams, not {coder!r}")
        n = [int(w.size) for w in words]
        table = np.zeros((len(words), max(max(n), 2)), dtype=np.int64)
        for row, w in enumerate(words):
            table[row, : w.size] = w.astype(np.int64)
        self.words = torch.from_numpy(table).to(device)
        count = torch.tensor(n, dtype=torch.long, device=device)
        top = self.words.gather(1, (count - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        below = self.words.gather(1, (count - 2).clamp(min=0).unsqueeze(1)).squeeze(1)
        self.state = torch.where(count >= 2, (top << 32) | below, torch.where(count == 1, top, 0))
        self.left = (count - 2).clamp(min=0)  # words still on the stack below the state
        self.bad = torch.zeros(len(words), dtype=torch.bool, device=device)

    def copy_(self, other: VectorRansDecoder) -> None:
        """Take other's streams and states, in place (a CUDA graph that captured this
        decoder's tensors then decodes them); this decoder's rows must be at least as wide,
        and at least as many: rows past other's hold empty streams (state 0, no words)."""
        n, width = other.words.shape
        self.words[:n, :width].copy_(other.words)
        self.words[:n, width:].zero_()
        self.words[n:].zero_()
        for mine, theirs in ((self.state, other.state), (self.left, other.left),
                             (self.bad, other.bad)):
            mine[:n].copy_(theirs)
            mine[n:].zero_()

    def copy_state_(self, other: VectorRansDecoder) -> None:
        """Take other's states (as after decoding with it), in place: its first rows, where
        other has more (streams of a padded decode group)."""
        n = self.state.shape[0]
        self.state.copy_(other.state[:n])
        self.left.copy_(other.left[:n])
        self.bad.copy_(other.bad[:n])

    def quantile(self) -> torch.Tensor:
        """Where each stream's state points in [0, 2**PRECISION): the next symbol is the one
        whose interval holds it."""
        return self.state & _MASK

    def step(self, pmf: torch.Tensor, active: torch.Tensor | Sequence[bool]) -> torch.Tensor:
        """Decode each active stream's next symbol under its row of pmf [B, n_symbols]."""
        found = locate_in_pmf(pmf, self.quantile())
        return self.advance(found, active, pmf.shape[-1])

    def advance(self, found: torch.Tensor, active: torch.Tensor | Sequence[bool],
                n_symbols: int) -> torch.Tensor:
        """Take each active stream's symbol, given as (symbol, start, freq) rows [B, 3] of
        the interval that holds its quantile (``locate_in_pmf``, or a kernel that finds the
        same without the table), and return the token ids (symbol - 1)."""
        active = torch.as_tensor(active, device=found.device)
        symbols, start, freq = found.unbind(1)
        state = freq * ((self.state >> PRECISION) & _LOW40) + self.quantile() - start
        refill = active & (((state >> 32) & _LOW32) == 0) & (self.left > 0)
        word = self.words.gather(1, (self.left - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        state = torch.where(refill, (state << 32) | word, state)
        # In place, so a CUDA graph that captured this step advances the same tensors.
        self.left.sub_(refill.long())
        self.state.copy_(torch.where(active, state, self.state))
        self.bad |= active & _reserved(symbols, n_symbols)
        # A corrupt stream may land on a reserved symbol: keep feeding the model valid ids
        # (finish() reports the corruption) rather than indexing outside its vocabulary.
        return (symbols - 1).clamp(0, n_symbols - 3)

    def finish(self) -> None:
        # Decoding undoes every encode step: a sound stream ends empty, with state 0.
        if bool(self.bad.any()):
            raise BlobError("corrupt token stream: decoded a reserved symbol")
        if bool((self.state != 0).any() | (self.left != 0).any()):
            raise BlobError("corrupt token stream: data left over after the last token")


def locate_in_pmf(pmf: torch.Tensor, quantile: torch.Tensor) -> torch.Tensor:
    """(symbol, start, freq) [B, 3] of the interval of pmf [B, n] (integer frequencies summing
    to 2**PRECISION) that holds each quantile [B]."""
    cdf = pmf.cumsum(dim=-1)
    symbols = torch.searchsorted(cdf, quantile.unsqueeze(1), right=True)
    symbols = symbols.clamp_(max=pmf.shape[-1] - 1)
    freq = pmf.gather(1, symbols)
    return torch.cat([symbols, cdf.gather(1, symbols) - freq, freq], dim=1)


def default_coder(device: torch.device) -> str:
    return "range" if device.type == "cpu" else "ans"


def decoder_for(device: torch.device, coder: str):
    """The vectorized decoder for rANS streams on accelerators; constriction otherwise."""
    return VectorRansDecoder if coder == "ans" and device.type != "cpu" else ConstrictionDecoder
