"""Token streams coded under the integer engine (the token tier's and the store's coder).

Encode is one batched prefill: every position's distribution at once, from which only each
token's (start, freq) interval leaves the device, range-coded by constriction's rANS coder.
Decode is step by step: every stream of a group advances one token per step, and the step
(forward, distribution, vectorized rANS decode, state update, cache write) is captured once
as a CUDA graph per attention span on GPUs. Because the engine is exact integer arithmetic,
the encoder's prefill and the decoder's steps give the same frequencies at every position,
at any group size, on any device: groups are chosen for speed alone.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..core.decoders import VectorRansDecoder, encode_stream, locate_in_pmf
from .cpu_step import CpuStep
from .model import IntModel

# GPUs: idle decode groups a codec keeps, as a share of the GPU's memory. A 16th holds the
# three groups of a 256-session restore (~4 GB for 256 streams x 320 positions of SmolLM2);
# a fixed 4 GiB held two, and each restore evicted the group the next one needed first.
POOL_SHARE = 16
CPU_POOL_BYTES = 256 << 20  # on CPUs: a few small groups (a chat's edges decode one by one)
MAX_KEPT_GROUPS = 16
Progress = Callable[[int], None]


def _rows_budget(device: torch.device) -> int:
    """Tokens prefilled per group: bounded by host memory on CPUs, by speed on GPUs."""
    return 2048 if device.type == "cpu" else 65536


class EngineCodec:
    """Encode and decode token streams, each from position 0 after ``prime``."""

    def __init__(self, model: IntModel, prime: int, graphs: bool | None = None,
                 pool_bytes: int | None = None) -> None:
        self.model = model
        self.prime = int(prime)
        self.device = model.device
        self.graphs = (self.device.type == "cuda") if graphs is None else graphs
        # decode groups kept with their captured graphs for the next decode of the same shape
        # (GPUs): a group's cache, eager warm-up step and capture are paid once (an estimated
        # ~0.08 s a decode on the H200: one stream decoded 256 tokens at 530 steps/s end to
        # end where its graph replays alone ran 635, BENCHMARKS.md)
        if pool_bytes is None:
            pool_bytes = (torch.cuda.get_device_properties(self.device).total_memory
                          // POOL_SHARE if self.graphs and self.device.type == "cuda"
                          else CPU_POOL_BYTES if self.device.type == "cpu" else 0)
        self._pool = _GroupPool(pool_bytes, round_streams=self.graphs)

    # -- encode ---------------------------------------------------------------------------
    def intervals(self, streams: Sequence[Sequence[int]], skip: Sequence[int] | None = None,
                  progress: Progress | None = None) -> list[np.ndarray]:
        """(start, freq) rows [n - skip, 2] of each stream's tokens after its first ``skip``
        (context that is fed, not coded)."""
        skip = list(skip) if skip is not None else [0] * len(streams)
        out: list[np.ndarray | None] = [None] * len(streams)
        order = sorted(range(len(streams)), key=lambda i: -len(streams[i]))
        budget = _rows_budget(self.device)
        group: list[int] = []
        for i in order + [-1]:
            if i >= 0 and (not group or (len(group) + 1) * len(streams[group[0]]) <= budget):
                group.append(i)
                continue
            if group:
                rows = self._encode_group([streams[j] for j in group], [skip[j] for j in group])
                for j, r in zip(group, rows, strict=True):
                    out[j] = r
                    if progress:
                        progress(len(r))
            group = [i]
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _encode_group(self, streams: list[Sequence[int]], skip: list[int]) -> list[np.ndarray]:
        lengths = [len(s) for s in streams]
        t = max(lengths)
        inputs = torch.full((len(streams), t), self.prime, dtype=torch.long)
        targets = torch.zeros((len(streams), t), dtype=torch.long)
        for row, s in enumerate(streams):
            ids = torch.as_tensor(list(s), dtype=torch.long)
            inputs[row, 1 : len(s)] = ids[:-1]
            targets[row, : len(s)] = ids
        keep = torch.zeros((len(streams), t), dtype=torch.bool)
        for row, (n, k) in enumerate(zip(lengths, skip, strict=True)):
            keep[row, k:n] = True
        h = self.model.prefill_hidden(inputs.to(self.device))
        flat_keep = keep.reshape(-1).to(self.device)
        h = h.reshape(-1, h.shape[-1])[flat_keep]
        start, freq = self.model.intervals(h, targets.reshape(-1).to(self.device)[flat_keep])
        rows = torch.stack([start, freq], dim=1).cpu().numpy()
        counts = keep.sum(dim=1).tolist()
        return list(np.split(rows, np.cumsum(counts)[:-1]))

    @torch.inference_mode()
    def frequency_digest(self, ids: Sequence[int]) -> str:
        """blake2b of every position's full frequency table for one stream: the golden vector
        that pins the engine's numerics across machines."""
        inputs = torch.as_tensor([[self.prime, *list(ids)[:-1]]], dtype=torch.long)
        h = self.model.prefill_hidden(inputs.to(self.device))[0]
        digest = hashlib.blake2b(digest_size=16)
        for _, pmf in self.model.head_pmf(h):
            digest.update(pmf.cpu().numpy().astype("<i8").tobytes())
        return digest.hexdigest()

    def encode(self, streams: Sequence[Sequence[int]],
               progress: Progress | None = None) -> list[np.ndarray]:
        """One rANS stream (uint32 words) per token stream."""
        return [encode_stream("ans", r[:, 0], r[:, 1])
                for r in self.intervals(streams, progress=progress)]

    # -- decode ---------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, words: Sequence[np.ndarray], lengths: Sequence[int],
               contexts: Sequence[Sequence[int]] | None = None,
               progress: Progress | None = None,
               decoder: VectorRansDecoder | None = None,
               capacity: int = 0) -> list[list[int]]:
        """Decode streams of ``lengths`` tokens in one lockstep group; each continues its
        context (fed, not decoded; default none).

        ``decoder``: carry on an open decoder of these streams (whose state persists across
        calls, e.g. across context resets) instead of opening one; the caller then checks its
        end with ``decoder.finish()``. ``capacity``: positions to size the group for at least
        (a caller that will continue these streams in later decodes passes their total, so
        those find this group, whose cache already holds their contexts, and skip the
        contexts' prefill)."""
        return [t for t, _ in self.decode_intervals(words, lengths, contexts, progress,
                                                     decoder, capacity)]

    @torch.inference_mode()
    def decode_intervals(self, words: Sequence[np.ndarray], lengths: Sequence[int],
                         contexts: Sequence[Sequence[int]] | None = None,
                         progress: Progress | None = None,
                         decoder: VectorRansDecoder | None = None, capacity: int = 0
                         ) -> list[tuple[list[int], np.ndarray]]:
        """``decode``, with each token's (start, freq) rows [n, 2] as ``intervals`` gives
        them: the decoder found them anyway, so a caller that keeps them (the store, to cut
        an edge without the model) need not encode what it decoded."""
        contexts = [list(c) for c in contexts] if contexts is not None else [[]] * len(words)
        lengths = list(lengths)
        rows = decoder.state.shape[0] if decoder is not None else len(words)
        if not len(lengths) == len(contexts) == rows == len(words):
            raise ValueError(f"{len(words)} streams with {len(lengths)} lengths, "
                             f"{len(contexts)} contexts and a decoder of {rows}")
        if not words or max(lengths, default=0) == 0:
            return [([], np.zeros((0, 2), dtype=np.int64)) for _ in words]
        own = decoder or VectorRansDecoder(list(words), self.device)
        # every stream steps max(lengths) times (finished ones idle in place)
        capacity = max(max(len(c) for c in contexts) + max(lengths) + 1, capacity)
        key = self._pool.key(len(words), capacity, own.words.shape[1])
        group = self._pool.take(key)
        try:
            group = group if group is not None else _DecodeGroup(self, *key)
            out = group.run(own, lengths, contexts, progress)
        except torch.OutOfMemoryError:  # the kept groups' memory is the first to go (a
            if not self._pool.free:  # failed run leaves own's states as they were)
                raise
            self._pool.clear()
            group = _DecodeGroup(self, *key)
            out = group.run(own, lengths, contexts, progress)
        self._pool.give(key, group)  # only after a decode that ran to its end
        out = out[: len(words)]
        if decoder is None:
            own.finish()
        return out


def advance_streams(decoder: VectorRansDecoder, found: torch.Tensor, n_symbols: int,
                    step: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor,
                    pos: torch.Tensor, out: torch.Tensor, rows: torch.Tensor) -> None:
    """A decode step's tail in place, given each stream's (symbol, start, freq) [B, 3] under
    its n_symbols distribution: the decoder advances the streams still decoding (step[b] <
    lengths[b]); tokens[b] becomes the decoded token where it does; out[b, step[b]] =
    tokens[b], rows[b, step[b]] = (start, freq); pos and step (int64 [B]) go up by one.
    cuda_ops.decode_step does the same in locate's kernels."""
    active = step < lengths
    symbols = decoder.advance(found, active, n_symbols)
    tokens.copy_(torch.where(active, symbols, tokens))
    b = out.shape[0]
    out.scatter_(1, step.view(b, 1), tokens.unsqueeze(1))
    rows.scatter_(1, step.view(b, 1, 1).expand(b, 1, 2), found[:, None, 1:])
    pos.add_(1)
    step.add_(1)


class _DecodeGroup:
    """Static buffers of lockstep decodes of ``b`` streams within ``capacity`` positions, and
    their step (captured per attention span on GPUs): loaded afresh by each decode, so its
    graphs serve every decode of the same shape."""

    def __init__(self, codec: EngineCodec, b: int, capacity: int, n_words: int):
        m, dev = codec.model, codec.device
        self.codec, self.model, self.capacity = codec, m, capacity
        # CPUs step through cpu_kernels where they run (the same integers, ~4x fewer seconds)
        self.fast = CpuStep.for_model(m) if dev.type == "cpu" else None
        self.cache = (self.fast or m).new_cache(b, capacity)
        self.tokens = torch.zeros(b, dtype=torch.long, device=dev)
        self.pos = torch.zeros(b, dtype=torch.long, device=dev)
        self.lengths = torch.zeros(b, dtype=torch.long, device=dev)
        self.step_t = torch.zeros(b, dtype=torch.long, device=dev)  # per stream, all equal
        self.out = torch.zeros((b, capacity), dtype=torch.long, device=dev)
        self.rows = torch.zeros((b, capacity, 2), dtype=torch.long, device=dev)
        self.decoder = VectorRansDecoder([np.zeros(n_words, dtype=np.uint32)] * b, dev)
        # per stream, the ids whose keys and values the cache holds at positions 0.. (the
        # prime first), so a decode that continues the last one skips its contexts' prefill
        self.held: list[list[int]] = [[] for _ in range(b)]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # one per attention span
        self.stepped: set[int] = set()  # spans stepped eagerly: their kernels are compiled
        self._mempool = torch.cuda.graph_pool_handle() if codec.graphs else None
        # what keeping it holds: the KV cache and buffers, and an estimate of its graphs' own
        # pool (the step's intermediates, the widest of them a few [b, vocab] int64 rows)
        self.nbytes = sum(t.numel() * t.element_size() for t in (
            *self.cache.keys, *self.cache.values, *(self.cache.major or ()), self.out,
            self.rows, self.decoder.words))
        self.nbytes += 4 * 8 * b * m.spec.vocab

    def _load(self, decoder: VectorRansDecoder, lengths: list[int],
              contexts: list[list[int]]) -> None:
        """This decode's streams, states and contexts into the static buffers (in place)."""
        m, dev = self.model, self.codec.device
        prefixes = [[self.codec.prime] + c for c in contexts]
        self.start = [len(p) - 1 for p in prefixes]  # position of each stream's first fed token
        self.steps = max(lengths)
        longest = max(self.start)
        held = all(h[: len(p) - 1] == p[:-1] for h, p in zip(self.held, prefixes, strict=True))
        self.prefixes, self.held = prefixes, [[] for _ in prefixes]  # known again at the end
        if longest > 0 and not held:  # contexts: keys and values by one prefill, as steps write
            ids = torch.full((len(prefixes), longest), self.codec.prime, dtype=torch.long)
            for row, p in enumerate(prefixes):
                ids[row, : len(p) - 1] = torch.as_tensor(p[:-1])
            m.prefill_hidden(ids.to(dev), cache=self.cache)
        self.tokens.copy_(torch.as_tensor([p[-1] for p in prefixes]))
        self.pos.copy_(torch.as_tensor(self.start))
        self.lengths.copy_(torch.as_tensor(lengths))
        self.step_t.zero_()
        self.decoder.copy_(decoder)

    def _span(self, step: int) -> int:
        need = max(self.start) + step + 1
        if self.cache.dtype != torch.float64:  # the fused kernels (float16 caches on GPUs,
            # int32 on CPUs) attend each stream's own length: one graph serves every step
            return self.capacity
        if not self.codec.graphs:
            return need
        span = 64
        while span < need:
            span *= 2
        return min(span, self.capacity)

    def _step(self, span: int) -> None:
        m, bufs = self.model, (self.step_t, self.lengths, self.tokens, self.pos, self.out,
                               self.rows)
        if self.fast is not None:
            pmf = self.fast.pmf(self.cache, self.tokens, self.pos)
            found = locate_in_pmf(pmf, self.decoder.quantile())
            advance_streams(self.decoder, found, pmf.shape[-1], *bufs)
            return
        logits = m.step_logits(self.cache, self.tokens, self.pos, span)
        if m.fused_locate:  # the search, the decoder's step and the bookkeeping: 4 kernels
            m.decode_step(logits, self.decoder, *bufs)
        else:
            found = m.locate(logits, self.decoder.quantile())
            advance_streams(self.decoder, found, logits.shape[-1] + 2, *bufs)

    def _graph(self, span: int) -> torch.cuda.CUDAGraph:
        if span not in self.graphs:
            if self.model.compiled and span not in self.stepped:
                self._warm_up(span)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a server's other threads may run the model meanwhile
            with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
                self._step(span)
            self.graphs[span] = graph
        return self.graphs[span]

    def _warm_up(self, span: int) -> None:
        """Run one step at ``span`` eagerly and undo it: a compiled model compiles the step's
        kernels here, since compiling inside a graph capture fails. The cache write it makes
        is rewritten with the same values by the real step."""
        state = [self.tokens, self.pos, self.step_t, self.out, self.decoder.state,
                 self.decoder.left, self.decoder.bad]
        saved = [t.clone() for t in state]
        self._side_step(span)
        for tensor, value in zip(state, saved, strict=True):
            tensor.copy_(value)

    def _side_step(self, span: int) -> None:
        """One eager step on a side stream, as PyTorch asks before a graph capture."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(span)
        torch.cuda.current_stream().wait_stream(side)
        self.stepped.add(span)

    def run(self, decoder: VectorRansDecoder, lengths: list[int], contexts: list[list[int]],
            progress: Progress | None) -> list[tuple[list[int], np.ndarray]]:
        """Every step of one decode of ``decoder``'s streams (whose states advance); each
        stream's tokens and their (start, freq) rows. A group wider than the decode (its
        pool rounds stream counts up) idles its last streams: no tokens, no context."""
        pad = self.tokens.shape[0] - len(lengths)
        lengths, contexts = list(lengths) + [0] * pad, list(contexts) + [[]] * pad
        self._load(decoder, lengths, contexts)
        for step in range(self.steps):
            span = self._span(step)
            if self.codec.graphs and (step > 0 or span in self.graphs):
                self._graph(span).replay()
            elif self.codec.graphs:  # the first step eagerly: the warm-up before capturing
                self._side_step(span)
            else:
                self._step(span)
            if progress:
                progress(sum(1 for n in lengths if step < n))
        decoder.copy_state_(self.decoder)
        # copies: on CPUs .cpu() is the group's own buffer, which a kept group's next decode
        # overwrites
        tokens = self.out[:, : self.steps].cpu()
        rows = self.rows[:, : self.steps].cpu().numpy().copy()
        out = [(tokens[i, :n].tolist(), rows[i, :n]) for i, n in enumerate(lengths)]
        # a stream's steps fed its prefix's last id and its tokens but the last; idle steps
        # past its length write positions that a continuation rewrites before reading
        self.held = [p + t[: n - 1] if n else p[:-1]
                     for p, (t, _), n in zip(self.prefixes, out, lengths, strict=True)]
        return out


class _GroupPool:
    """Decode groups not in use, by shape, up to a budget of KV-cache bytes (the oldest go
    first). A group is taken out while it decodes, so threads sharing a codec never share
    one."""

    def __init__(self, budget: int, round_streams: bool = False) -> None:
        self.budget = budget
        self.round_streams = round_streams
        self.free: OrderedDict[tuple[int, int, int], _DecodeGroup] = OrderedDict()
        self.lock = threading.Lock()

    def key(self, streams: int, capacity: int, n_words: int) -> tuple[int, int, int]:
        """A group's shape, rounded up where groups are kept so nearby decodes share one: the
        capacity to a multiple of 64 (the GPU attention launches a program per 32 slots or
        more: at 256 streams on the H200 it took 1.96 ms a step at capacity 512, 1.44 at
        302), the words to a power of two; with ``round_streams`` (GPUs) the streams too."""
        if self.budget <= 0:
            return streams, capacity, n_words
        if self.round_streams:
            streams = rounded_streams(streams)
        return streams, -(-capacity // 64) * 64, 1 << max(6, (n_words - 1).bit_length())

    def take(self, key: tuple[int, int, int]) -> _DecodeGroup | None:
        with self.lock:
            return self.free.pop(key, None)

    def give(self, key: tuple[int, int, int], group: _DecodeGroup) -> None:
        if group.nbytes > self.budget:
            return
        with self.lock:
            self.free[key] = group
            while (len(self.free) > MAX_KEPT_GROUPS
                   or sum(g.nbytes for g in self.free.values()) > self.budget):
                self.free.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.free.clear()


def rounded_streams(n: int) -> int:
    """The streams of a kept GPU decode group that decodes n: a server batches whatever
    requests are waiting, and each new group shape costs a set-up, eager steps and a graph
    capture (a 256-session restore's three groups: 0.24-0.41 s on the H200, BENCHMARKS.md),
    where idle streams in a small group cost little (on the H200 a step of 16 streams took
    1.1-1.4 ms, of one 1.0-1.2). Powers of two up to 64, then four significant bits: under
    12.5% idle."""
    if n <= 64:
        return 1 << max(0, (n - 1).bit_length())
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step
