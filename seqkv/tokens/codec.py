"""Token IDs entropy-coded under the model's own next-token distribution (arXiv 2604.15356, §4),
by the HF lockstep procedure (core/stepper.py): the coder of the architectures the integer
engine does not cover. Its split into chunks (``split_chunks``) serves the engine too.

A sequence is cut into chunks of at most ``chunk_size`` tokens. Each chunk is an independent
stream: its context is reset to the prime token, so chunks decode in parallel (one lockstep
group of up to ``batch`` chunks at a time) and no chunk outgrows the model's context window.
The price is the context lost at each chunk start (about 100 bits on SmolLM2) plus the
coder's flush per chunk (~16 bits for the range coder, ~32 for rANS), hence long default
chunks.

Each chunk is one stream of constriction's range coder (on the CPU) or rANS coder (on GPUs,
where its decoder vectorizes across streams): see core/decoders.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from ..core.decoders import CODERS, decoder_for, default_coder, encode_stream
from ..core.distribution import model_bits, symbol_intervals
from ..core.errors import SeqkvError
from ..core.models import LoadedModel
from ..core.stepper import (
    PROCEDURE,
    PROCEDURES,
    NumericsProfile,
    numerics_profile,
    run_lockstep,
    use_repeatable_attention,
)

DEFAULT_CHUNK = 2048
DEFAULT_BATCH = 16


@dataclass
class CodedChunk:
    n_tokens: int
    words: np.ndarray  # uint32

    @property
    def bits(self) -> int:
        return 32 * int(self.words.size)


@dataclass
class TokenCoding:
    """The coded chunks and what the model itself said the tokens cost."""

    chunks: list[CodedChunk]
    chunk_size: int
    profile: NumericsProfile
    coder: str
    model_bits: float = 0.0
    per_token_bits: list[float] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(c.n_tokens for c in self.chunks)

    @property
    def bits(self) -> int:
        return sum(c.bits for c in self.chunks)


def split_chunks(n_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_size, n_tokens)) for s in range(0, n_tokens, chunk_size)]


def _groups(n_chunks: int, batch: int) -> list[range]:
    return [range(g, min(g + batch, n_chunks)) for g in range(0, n_chunks, batch)]


class TokenCodec:
    """Encode and decode token ids under one model, one canonical procedure.

    ``decoder`` picks the stream decoder (default: constriction on CPU, the vectorized rANS
    decoder elsewhere); both read the same bitstream.
    """

    def __init__(
        self,
        lm: LoadedModel,
        chunk_size: int = DEFAULT_CHUNK,
        batch: int = DEFAULT_BATCH,
        decoder: type | None = None,
        procedure: str = PROCEDURE,
        coder: str | None = None,
    ) -> None:
        max_pos = getattr(lm.config.get_text_config(), "max_position_embeddings", None)
        limit = (int(max_pos) - 1) if max_pos else chunk_size  # position 0 is the prime token
        if chunk_size < 1 or batch < 1:
            raise SeqkvError("chunk size and batch must be positive")
        self.lm = lm
        self.chunk_size = min(chunk_size, limit)
        self.batch = batch
        self.coder = coder or default_coder(lm.device)
        if self.coder not in CODERS:
            raise SeqkvError(f"unknown entropy coder {self.coder!r}; one of {CODERS}")
        self.decoder = decoder or decoder_for(lm.device, self.coder)
        if procedure not in PROCEDURES:
            raise SeqkvError(f"unknown coding procedure {procedure!r}; one of {PROCEDURES}")
        self.procedure = procedure
        use_repeatable_attention(lm)

    def profile(self, n_chunks: int) -> NumericsProfile:
        return numerics_profile(self.lm, min(self.batch, max(n_chunks, 1)), self.procedure)

    def encode(self, ids: Sequence[int], progress: bool = False) -> TokenCoding:
        ids_t = torch.as_tensor(list(ids), dtype=torch.long)
        if ids_t.numel() == 0:
            raise SeqkvError("nothing to encode: zero tokens")
        if int(ids_t.min()) < 0 or int(ids_t.max()) >= self.lm.vocab_size:
            raise SeqkvError(f"token id out of range for a vocabulary of {self.lm.vocab_size}")
        spans = split_chunks(ids_t.numel(), self.chunk_size)
        chunks: list[CodedChunk] = []
        per_token: list[float] = []
        with tqdm(total=ids_t.numel(), desc="encode", unit="tok", disable=not progress) as bar:
            for group in _groups(len(spans), self.batch):
                streams = [ids_t[spans[i][0] : spans[i][1]] for i in group]
                coded, bits = self._encode_group(streams, bar)
                chunks.extend(coded)
                per_token.extend(bits)
        return TokenCoding(chunks, self.chunk_size, self.profile(len(spans)), self.coder,
                           float(sum(per_token)), per_token)

    def _encode_group(self, streams: list[torch.Tensor], bar) -> tuple[list[CodedChunk], list]:
        lengths = [s.numel() for s in streams]
        steps = max(lengths)
        # Finished streams keep being fed their last token: fixed shapes on both sides.
        table = torch.stack(
            [torch.cat([s, s[-1:].expand(steps - s.numel())]) for s in streams]
        ).to(self.lm.device)
        starts = torch.empty_like(table)
        freqs = torch.empty_like(table)
        bits = torch.empty(table.shape, dtype=torch.float64, device=table.device)

        def on_step(step: int, pmf: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            tokens = table[:, step]
            starts[:, step], freqs[:, step] = symbol_intervals(pmf, tokens)
            bits[:, step] = model_bits(logits, tokens)
            bar.update(sum(1 for n in lengths if step < n))
            return tokens

        self._run(len(streams), steps, on_step)
        # Only (start, freq) per token reaches the host, never a distribution.
        starts_np, freqs_np, bits_np = starts.cpu().numpy(), freqs.cpu().numpy(), bits.cpu()
        coded, per_token = [], []
        for row, n in enumerate(lengths):
            words = encode_stream(self.coder, starts_np[row, :n], freqs_np[row, :n])
            coded.append(CodedChunk(n, words))
            per_token.extend(bits_np[row, :n].tolist())
        return coded, per_token

    def _run(self, n_streams: int, steps: int, on_step) -> None:
        run_lockstep(self.lm, n_streams, steps, on_step, self.procedure)

    def decode(
        self, chunks: Sequence[CodedChunk], profile: dict | None = None, progress: bool = False
    ) -> list[int]:
        if profile is not None:
            self.profile(len(chunks)).check(profile)
        out: list[int] = []
        total = sum(c.n_tokens for c in chunks)
        with tqdm(total=total, desc="decode", unit="tok", disable=not progress) as bar:
            for group in _groups(len(chunks), self.batch):
                out.extend(self._decode_group([chunks[i] for i in group], bar))
        return out

    def _decode_group(self, members: list[CodedChunk], bar) -> list[int]:
        lengths = torch.tensor([c.n_tokens for c in members])
        steps = int(lengths.max())
        device = self.lm.device
        decoder = self.decoder([c.words for c in members], device, self.coder)
        decoded = torch.zeros((len(members), steps), dtype=torch.long, device=device)
        last = torch.arange(len(members), device=device)
        lengths_dev = lengths.to(device)

        def on_step(step: int, pmf: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            active = lengths_dev > step
            tokens = decoder.step(pmf, active)
            # Finished streams repeat their last token, exactly as the encoder fed them.
            tokens = torch.where(active, tokens, decoded[last, (lengths_dev - 1).clamp(max=step)])
            decoded[:, step] = tokens
            bar.update(int(active.sum()))
            return tokens

        self._run(len(members), steps, on_step)
        decoder.finish()
        rows = decoded.cpu()
        return [t for row, n in enumerate(lengths.tolist()) for t in rows[row, :n].tolist()]
