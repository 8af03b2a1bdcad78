"""Token IDs entropy-coded under the model's own next-token distribution (arXiv 2604.15356, §4).

A sequence is cut into chunks of at most ``chunk_size`` tokens. Each chunk is an independent
stream: its context is reset to the prime token, so chunks decode in parallel (one lockstep
group of up to ``batch`` chunks at a time) and no chunk outgrows the model's context window.
The price is the context lost at each chunk start (about 100 bits on SmolLM2) plus
one 32-bit word of coder flush per chunk, hence long default chunks.

Each chunk is coded with constriction's rANS coder (``stack.AnsCoder``, 24-bit precision,
32-bit words): range coding in the asymmetric-numeral-systems form, whose decoder is a
handful of integer operations per stream and so vectorizes across streams on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import constriction
import numpy as np
import torch
from tqdm import tqdm

from .distribution import full_weights, model_bits, reduced_weights, symbol_intervals
from .errors import BlobError, SeqkvError
from .models import LoadedModel
from .stepper import NumericsProfile, numerics_profile, run_lockstep

DEFAULT_CHUNK = 1024
DEFAULT_BATCH = 16
_Categorical = constriction.stream.model.Categorical


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
    """Encode and decode token ids under one model, one canonical procedure."""

    def __init__(
        self, lm: LoadedModel, chunk_size: int = DEFAULT_CHUNK, batch: int = DEFAULT_BATCH
    ) -> None:
        max_pos = getattr(lm.config.get_text_config(), "max_position_embeddings", None)
        limit = (int(max_pos) - 1) if max_pos else chunk_size  # position 0 is the prime token
        if chunk_size < 1 or batch < 1:
            raise SeqkvError("chunk size and batch must be positive")
        self.lm = lm
        self.chunk_size = min(chunk_size, limit)
        self.batch = batch

    def profile(self, n_chunks: int) -> NumericsProfile:
        return numerics_profile(self.lm, min(self.batch, max(n_chunks, 1)))

    def encode(self, ids: Sequence[int], progress: bool = False) -> TokenCoding:
        ids_t = torch.as_tensor(list(ids), dtype=torch.long)
        if ids_t.numel() == 0:
            raise SeqkvError("nothing to encode: zero tokens")
        if int(ids_t.min()) < 0 or int(ids_t.max()) >= self.lm.vocab_size:
            raise SeqkvError(f"token id out of range for a vocabulary of {self.lm.vocab_size}")
        spans = split_chunks(ids_t.numel(), self.chunk_size)
        chunks: list[CodedChunk] = []
        per_token: list[float] = []
        bar = tqdm(total=ids_t.numel(), desc="encode", unit="tok", disable=not progress)
        for group in _groups(len(spans), self.batch):
            lengths = [spans[i][1] - spans[i][0] for i in group]
            steps = max(lengths)
            # Finished streams keep being fed their last token: fixed shapes on both sides.
            table = torch.stack(
                [
                    torch.nn.functional.pad(
                        ids_t[spans[i][0] : spans[i][1]], (0, steps - n), value=int(ids_t[spans[i][1] - 1])
                    )
                    for i, n in zip(group, lengths, strict=True)
                ]
            ).to(self.lm.device)
            starts = torch.empty_like(table)
            freqs = torch.empty_like(table)
            bits = torch.empty(table.shape, dtype=torch.float64)

            def on_step(step: int, pmf: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
                tokens = table[:, step]
                starts[:, step], freqs[:, step] = symbol_intervals(pmf, tokens)
                bits[:, step] = model_bits(logits, tokens).cpu()
                bar.update(sum(1 for n in lengths if step < n))
                return tokens

            run_lockstep(self.lm, len(group), steps, on_step)
            starts_np, freqs_np = starts.cpu().numpy(), freqs.cpu().numpy()
            for row, n in enumerate(lengths):
                coder = constriction.stream.stack.AnsCoder()
                coder.encode_reverse(
                    np.ones(n, dtype=np.int32),
                    _Categorical(perfect=False),
                    reduced_weights(starts_np[row, :n], freqs_np[row, :n]),
                )
                chunks.append(CodedChunk(n, coder.get_compressed().astype(np.uint32)))
                per_token.extend(bits[row, :n].tolist())
        bar.close()
        return TokenCoding(
            chunks, self.chunk_size, self.profile(len(spans)), float(sum(per_token)), per_token
        )

    def decode(
        self, chunks: Sequence[CodedChunk], profile: dict | None = None, progress: bool = False
    ) -> list[int]:
        if profile is not None:
            self.profile(len(chunks)).check(profile)
        out: list[int] = []
        bar = tqdm(total=sum(c.n_tokens for c in chunks), desc="decode", unit="tok",
                   disable=not progress)
        for group in _groups(len(chunks), self.batch):
            members = [chunks[i] for i in group]
            lengths = [c.n_tokens for c in members]
            coders = [constriction.stream.stack.AnsCoder(c.words) for c in members]
            decoded = torch.zeros((len(group), max(lengths)), dtype=torch.long)

            def on_step(step: int, pmf: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
                pmf_np = pmf.cpu().numpy()
                for row, coder in enumerate(coders):
                    if step < lengths[row]:
                        try:
                            symbol = coder.decode(_Categorical(full_weights(pmf_np[row]),
                                                               perfect=False))
                        except Exception as e:  # constriction raises on exhausted streams
                            raise BlobError(f"corrupt token stream: {e}") from e
                        if not 1 <= symbol <= pmf_np.shape[1] - 2:
                            raise BlobError("corrupt token stream: decoded a reserved symbol")
                        decoded[row, step] = symbol - 1
                    else:
                        decoded[row, step] = decoded[row, lengths[row] - 1]
                bar.update(sum(1 for n in lengths if step < n))
                return decoded[:, step]

            run_lockstep(self.lm, len(group), max(lengths), on_step)
            for row, n in enumerate(lengths):
                out.extend(decoded[row, :n].tolist())
        bar.close()
        return out
