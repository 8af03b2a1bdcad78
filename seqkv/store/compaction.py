"""Compaction: pending raw edges coded under the model, many at once, swapped in atomically.

One round takes a batch of raw edges (shallowest first) from a snapshot, gathers each one's
path tokens (decoding coded ancestors this process has not seen), codes them all through the
one model seam (``coding.encode_edges``), and only then opens a write transaction, in which
each edge is swapped raw -> coded by compare-and-swap: the swap happens only if the edge's
record still says raw, with the same parent, start, length and token hash. An edge another
writer split, deleted or coded meanwhile is left alone (its new raw halves are picked up by
the next round). The model never runs under the write lock.

Edges the tier policy keeps raw (a ``tier`` record, ``checkpoints.py``) are left raw: a hot
edge is restored without the model. Once the policy lets one cool (deletes its record), the
next round codes it like any pending edge; the swap checks, inside the transaction, that no
record was written for it meanwhile. An edge whose intervals this process already has (it was
coded, then swapped back to raw) is coded from them, without the model.

Safety: a round's swaps commit together or not at all (one backend transaction), an edge keeps
its id when coded, so a kill -9 at any moment loses nothing and leaves no edge twice; running
again continues where it stopped, and coding an already coded store changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .coding import encode_edges, encode_intervals
from .records import pack_edge

if TYPE_CHECKING:
    from .store import Store

DEFAULT_BATCH = 64


@dataclass
class CompactResult:
    edges: int = 0  # raw edges swapped for coded ones
    tokens: int = 0  # their tokens
    coded_bits: int = 0  # bits of the streams written
    raw_bits: int = 0  # what those edges took raw (32 bits a token)
    skipped: int = 0  # changed by another writer meanwhile: left for the next round
    pending: int = 0  # raw edges still pending after this run
    kept_raw: int = 0  # raw edges the tier policy keeps raw (not pending)
    rounds: int = 0
    coded_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "coded_ids"}


def compact(store: Store, batch: int = DEFAULT_BATCH, max_rounds: int = 10_000) -> CompactResult:
    """Code every pending raw edge of ``store``'s namespace (at most ``max_rounds`` batches),
    except those the tier policy keeps raw."""
    lm = store._need_model()
    if batch < 1:
        raise ValueError("batch must be at least 1")
    result = CompactResult()
    for _ in range(max_rounds):
        store.refresh()
        todo = _pending(store)[:batch]
        if not todo:
            break
        result.rounds += 1
        # an edge coded before (kept raw since) has its intervals known: no model needed
        need = [n for n in todo if n.intervals is None]
        jobs, paths = [], {}
        for node in need:
            parent = node.parent
            if parent.id not in paths:
                paths[parent.id] = store._path_ids(store.trie.path(parent))[0]
            jobs.append((paths[parent.id], list(node.tokens)))
        coded_rows = {}
        if jobs:
            with store.model_lock:
                out = encode_edges(lm, store.chunk, jobs, store.procedure)
            coded_rows = {n.id: r for n, r in zip(need, out, strict=True)}
        rows = [coded_rows.get(n.id, n.intervals) for n in todo]
        coded = [(n.id, (n.parent.id, n.start, n.n, n.token_hash), encode_intervals(r), r)
                 for n, r in zip(todo, rows, strict=True)]

        def swap(txn, coded=coded) -> tuple[int, int, int, int, list[str]]:
            edges = tokens = bits = skipped = 0
            ids = []
            for node_id, expect, words, r in coded:
                cur = store.trie.nodes.get(node_id)  # the latest committed state
                if (cur is None or not cur.raw or node_id in store.checkpoints.raw
                        or (cur.parent.id, cur.start, cur.n, cur.token_hash) != expect):
                    skipped += 1
                    continue
                cur.raw, cur.words, cur.intervals = False, np.asarray(words, np.uint32), r
                txn.put("edge", node_id, pack_edge(cur))
                edges, tokens, bits = edges + 1, tokens + cur.n, bits + cur.bits
                ids.append(node_id)
            return edges, tokens, bits, skipped, ids

        edges, tokens, bits, skipped, ids = store._write(swap)
        result.edges += edges
        result.tokens += tokens
        result.coded_bits += bits
        result.raw_bits += 32 * tokens
        result.skipped += skipped
        result.coded_ids += ids
    store.refresh()
    result.pending = len(_pending(store))
    result.kept_raw = sum(1 for n in store.trie.pending() if n.id in store.checkpoints.raw)
    return result


def _pending(store: Store) -> list:
    """Raw edges to code (shallowest first): not those the tier policy keeps raw."""
    return [n for n in store.trie.pending() if n.id not in store.checkpoints.raw]
