"""Coding a trie edge: its tokens range-coded under P_M(token | the edge's full prefix).

The context of a token is a function of its *path* only, whichever session first stored it:
the store's canonical procedure is ``run_lockstep``'s with a group of one stream, applied
along the path with the context reset at fixed absolute positions. A token at absolute position
p is conditioned on [prime, path[w:p]] with w = p - p % chunk, fed one token per forward step
into a DynamicCache, exactly as ``seqkv.core.stepper.run_lockstep(lm, 1, ...)`` does for a chunk
(``tests/test_store_coding.py`` checks the two agree bit for bit). So an edge deep in the trie
is encoded and decoded with the same probabilities, and a split edge is a cut of its per-token
intervals, re-coded without the model.

The :class:`Cursor` is lazy: fed tokens whose intervals are already known cost nothing until a
distribution is needed, and then only the tokens since the last reset are run, so a put that
shares a long prompt pays at most ``chunk`` forward steps of context.

With the integer engine (seqkv.engine, the default where the architecture maps) the same rule
holds with the engine's probabilities: each (edge, window) piece is one stream of a batched
prefill when encoding, and edges decode together in one lockstep group per window, their
contexts fed by prefill (``_engine_encode`` / ``_engine_decode``). Stores record which
procedure coded them; stores of seqkv 0.1 keep the lockstep one.

Each edge is one rANS stream (core/decoders.py: constriction's AnsCoder, 24-bit fixed point,
the token codec's 3-symbol reduced model trick), so its cost is its tokens' information plus
at most ~64 bits.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from ..core.decoders import VectorRansDecoder, decode_one, encode_stream, open_decoder
from ..core.distribution import (
    quantized_pmf,
    symbol_intervals,
)
from ..core.models import LoadedModel
from ..core.stepper import cache_kwarg, configure_determinism

PROCEDURE = "plt-path-lockstep-v1"  # HF forward, one stream: the fallback (and seqkv 0.1)
ENGINE_PROCEDURE = "plt-path-engine"  # the integer engine: any device, any group


def encode_intervals(intervals: np.ndarray) -> np.ndarray:
    """Range-code tokens given their (start, freq) rows; the words of one rANS stream."""
    iv = np.asarray(intervals, dtype=np.int64).reshape(-1, 2)
    return encode_stream("ans", iv[:, 0], iv[:, 1])


class Cursor:
    """One path through the trie, with the canonical context of its next token."""

    def __init__(self, lm: LoadedModel, chunk: int) -> None:
        self.lm = lm
        self.chunk = chunk
        self.path: list[int] = []
        self._window = -1  # start of the chunk whose context is in the cache
        self._fed = 0  # model inputs run in this window (the prime counts as one)
        self._cache: DynamicCache | None = None
        self._pmf: torch.Tensor | None = None
        self._can_crop = False
        self.steps = 0  # forward steps run (for restore-cost accounting)
        self._kwarg = cache_kwarg(lm.model)
        configure_determinism(lm.device)

    def seek(self, path: list[int]) -> None:
        """Move to another path. The computed context is kept as far as the new path shares
        it: wholly if it continues what was run; else, within the same window, the cache is
        cropped back to the shared part (exact: the kept positions are the very K/V a fresh
        run computes), so sibling edges below one prefix do not re-run the prefix."""
        path = [int(t) for t in path]
        if self._window >= 0:
            w, fed, pos = self._window, self._fed, len(path)
            run = self.path[w : w + fed - 1]  # path tokens run as inputs after the prime
            m = 0
            while m < len(run) and w + m < pos and path[w + m] == run[m]:
                m += 1
            if m < len(run):  # the new path leaves (or ends inside) what was run
                keep = min(1 + m, pos - w)  # inputs to keep, at least one to re-run for pmf
                if pos - pos % self.chunk == w and keep >= 1 and self._can_crop:
                    self._cache.crop(keep - fed)
                    self._fed = keep
                else:
                    self._window = -1
        self.path = path

    def feed(self, tokens: list[int]) -> None:
        self.path.extend(int(t) for t in tokens)

    @torch.inference_mode()
    def _step(self, token: int) -> None:
        inputs = torch.full((1, 1), token, dtype=torch.long, device=self.lm.device)
        out = self.lm.model(input_ids=inputs, use_cache=True, logits_to_keep=1,
                            **{self._kwarg: self._cache})
        self._pmf = quantized_pmf(out.logits[:, -1, :])
        self._fed += 1
        self.steps += 1

    def pmf(self) -> torch.Tensor:
        """The fixed-point distribution [1, V+2] of the token at position len(path)."""
        pos = len(self.path)
        window = pos - pos % self.chunk
        if window != self._window:
            self._window, self._fed = window, 0
            self._cache = DynamicCache(config=self.lm.config)
            self._step(self.lm.prime_token())
            # cropping is exact only for full-attention layers (a sliding window drops K/V)
            self._can_crop = all(type(layer).__name__ == "DynamicLayer"
                                 for layer in self._cache.layers)
        while self._fed < pos - window + 1:
            self._step(self.path[window + self._fed - 1])
        return self._pmf

    def encode(self, tokens: list[int]) -> np.ndarray:
        """Intervals [n, 2] of ``tokens`` continuing the path (and feed them)."""
        rows = np.zeros((len(tokens), 2), dtype=np.int64)
        for j, t in enumerate(tokens):
            token = torch.tensor([int(t)], device=self.lm.device)
            start, freq = symbol_intervals(self.pmf(), token)
            rows[j] = (int(start), int(freq))
            self.path.append(int(t))
        return rows

    def decode(self, words: np.ndarray, n: int) -> tuple[list[int], np.ndarray]:
        """Decode an edge of n tokens continuing the path (and feed them)."""
        coder = open_decoder("ans", words)
        tokens, rows = [], np.zeros((n, 2), dtype=np.int64)
        for j in range(n):
            row = self.pmf()[0].cpu().numpy()
            symbol = decode_one(coder, row)
            cum = int(row[:symbol].sum())
            rows[j] = (cum, int(row[symbol]))
            tokens.append(symbol - 1)
            self.path.append(symbol - 1)
        return tokens, rows


# -- the seam a batched engine replaces ------------------------------------------------------
# Everything the store asks of the model goes through these two functions: a batch of edges,
# each with the tokens of its path above it. Rows are the tokens' fixed-point (start, freq)
# intervals under the canonical context rule above; the edge's stream is
# ``encode_intervals(rows)``. This implementation runs one Cursor (one stream at a time,
# reusing context where consecutive jobs share a path); a batched integer engine can take its
# place with the same signatures and the same rows.

EncodeJob = tuple[list[int], list[int]]  # (path before the edge, the edge's tokens)
DecodeJob = tuple[list[int], np.ndarray, int]  # (path before the edge, words, n tokens)


def procedure_for(lm: LoadedModel) -> str:
    """The coding procedure a new store of this model uses: the integer engine where the
    architecture maps (the same probabilities on every machine), else the HF lockstep one."""
    return ENGINE_PROCEDURE if lm.engine() is not None else PROCEDURE


def encode_edges(lm: LoadedModel, chunk: int, jobs: list[EncodeJob],
                 procedure: str = PROCEDURE) -> list[np.ndarray]:
    """The (start, freq) rows [n, 2] int64 of each job's edge tokens given its path."""
    if procedure == ENGINE_PROCEDURE:
        return _engine_encode(lm, chunk, jobs) if jobs else []
    cursor = Cursor(lm, chunk)
    out = []
    for path, tokens in jobs:
        cursor.seek(path)
        out.append(cursor.encode(tokens))
    return out


def decode_edges(lm: LoadedModel, chunk: int, jobs: list[DecodeJob],
                 procedure: str = PROCEDURE,
                 path_tokens: int = 0) -> list[tuple[list[int], np.ndarray]]:
    """Each job's edge decoded from its words given its path: (tokens, rows). A corrupt
    stream raises BlobError. ``path_tokens``: the longest whole path these edges begin (the
    engine sizes its group for it, so the next round of the same paths finds that group's
    cache holding its contexts)."""
    if procedure == ENGINE_PROCEDURE:
        return _engine_decode(lm, chunk, jobs, path_tokens) if jobs else []
    cursor = Cursor(lm, chunk)
    out = []
    for path, words, n in jobs:
        cursor.seek(path)
        out.append(cursor.decode(words, n))
    return out


# -- the integer engine behind the seam ------------------------------------------------------


def _windows(start: int, n: int, chunk: int) -> list[tuple[int, int]]:
    """(window start, tokens in it) of the positions [start, start + n), window by window."""
    out, p, end = [], start, start + n
    while p < end:
        w = p - p % chunk
        take = min(end, w + chunk) - p
        out.append((w, take))
        p += take
    return out


def _engine_encode(lm: LoadedModel, chunk: int, jobs: list[EncodeJob]) -> list[np.ndarray]:
    streams, skips, owner = [], [], []
    for j, (path, tokens) in enumerate(jobs):
        full = list(path) + list(tokens)
        for w, take in _windows(len(path), len(tokens), chunk):
            begin = max(len(path), w)
            streams.append(full[w : begin + take])
            skips.append(begin - w)
            owner.append(j)
    rows = lm.engine_codec().intervals(streams, skip=skips)
    out: list[list[np.ndarray]] = [[] for _ in jobs]
    for j, r in zip(owner, rows, strict=True):
        out[j].append(r)
    return [np.concatenate(r) if r else np.zeros((0, 2), dtype=np.int64) for r in out]


def _engine_decode(lm: LoadedModel, chunk: int, jobs: list[DecodeJob],
                   path_tokens: int = 0) -> list[tuple[list[int], np.ndarray]]:
    """All edges in one lockstep group per window round: an edge crossing a window boundary
    goes on in the next round from a fresh context, its rANS state carried over."""
    codec = lm.engine_codec()
    segments = [_windows(len(path), n, chunk) for path, _, n in jobs]
    decoder = VectorRansDecoder([np.asarray(w, dtype=np.uint32) for _, w, _ in jobs],
                                codec.device)
    decoded: list[list[int]] = [[] for _ in jobs]
    rows: list[list[np.ndarray]] = [[] for _ in jobs]
    words = [w for _, w, _ in jobs]
    for r in range(max((len(s) for s in segments), default=0)):
        lengths, contexts = [], []
        for (path, _, _), segs, got in zip(jobs, segments, decoded, strict=True):
            if r >= len(segs):
                lengths.append(0)
                contexts.append([])
                continue
            w, take = segs[r]
            full = list(path) + got
            lengths.append(take)
            contexts.append(full[w : max(len(path), w)])
        found = codec.decode_intervals(words, lengths, contexts, decoder=decoder,
                                       capacity=min(chunk, path_tokens) + 1)
        for got, kept, (new, new_rows) in zip(decoded, rows, found, strict=True):
            got.extend(new)
            kept.append(new_rows)
    decoder.finish()
    return [(got, np.concatenate(r) if r else np.zeros((0, 2), dtype=np.int64))
            for got, r in zip(decoded, rows, strict=True)]
