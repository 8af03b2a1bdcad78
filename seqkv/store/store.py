"""The PLT store: sessions as paths in a Probabilistic Language Trie, persisted in a backend.

``Store(db, lm, namespace)``: ``put`` a session (token ids or text, optionally its cache),
``get_ids`` / ``get_text`` / ``get_cache`` it back, ``delete``, ``stats``, ``nearest``;
``put_exact`` / ``get_exact``: the exact tier, a cache computed elsewhere stored as residuals
from the model's prediction and returned bit for bit.

- Write path: ``put`` matches a session's tokens against the namespace's trie and writes only
  the part after the longest shared prefix, as a *raw* edge (its token ids, checksummed), in
  one transaction, with no model work under the write lock: it returns once the session is
  durable. An edge a new session leaves mid-way is split (a coded edge whose intervals are in
  memory: a cut, both halves re-coded without the model; otherwise two raw halves). N sessions
  sharing a prompt pay for it once. Matching needs the tokens of the coded edges on the path:
  an edge the query passes through whole is recognised by its token hash; one the query ends
  or diverges inside is decoded with the model *before* the transaction is taken.
- Compaction (``compact()``, ``compaction.py``) later codes pending raw edges under the model
  (``coding.py``), many at once, and swaps each raw record for its coded one by
  compare-and-swap. Raw edges are read back without the model.
- Tiers (``policies.py``, ``checkpoints.py``): with a byte budget, ``rebalance`` lets the
  policy pick each node's tier from access counts and P_M: a KV checkpoint, its edge kept raw
  (compaction leaves it; a coded one that became hot is swapped back to raw), or coded.
  Without a budget every edge is coded, as compaction leaves it.
- Namespaces: each has its own trie, records, generation and checkpoint budget; nothing is
  matched, shared or evicted across them, so one tenant's contents cannot change another's
  stored bytes, or its put/get work (hence timing).
- A store records the model fingerprint and numerics profile (procedure, chunk, device,
  dtype, attention) on creation and refuses any other model with ModelMismatchError.
- Every write is one backend transaction: a killed writer leaves no partial session, and
  concurrent writers serialize (each re-reads the trie if another committed since); a writer
  that finds the store locked for longer than the busy bound gets StoreBusyError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from ..core.blob import pack
from ..core.cache import KVCache, RestoredCache, prefill_cache, token_hash
from ..core.errors import BlobError, ModelMismatchError, SeqkvError
from ..core.kvsize import fp16_kv_bits, turboquant_kv_bits
from ..core.models import LoadedModel
from ..core.stepper import numerics_profile
from ..core.textcodec import TextRecipe, decode_text, encode_text
from ..core.version import ENGINE_ID, engine_mismatch
from ..tokens.api import engine_chunk_size
from .backend import (
    META_NS,
    Backend,
    ModelNeededError,
    NoSessionError,
    NoStoreError,
    SessionExistsError,
    StoreBusyError,
    StoreConflict,
    StoreError,
)
from .checkpoints import CheckpointManager
from .coding import (
    ENGINE_PROCEDURE,
    PROCEDURE,
    decode_edges,
    encode_edges,
    encode_intervals,
    procedure_for,
)
from .compaction import DEFAULT_BATCH, CompactResult, compact
from .policies import NodeInfo, Policy, Tier, policy_by_name
from .records import (
    KINDS,
    StoreCorruptError,
    apply_changes,
    load_trie,
    pack_edge,
    pack_session,
    parse,
)
from .registry import open_backend
from .trie import Node, Trie, edge_hash

DEFAULT_CHUNK = 512
# The layout of a store's records: a later seqkv that changes it bumps this, and this version
# refuses its stores by name instead of misreading them.
STORE_FORMAT = 1
WRITE_ATTEMPTS = 20  # transactions one write may take (conflicts, edges to decode first)
R = TypeVar("R")

__all__ = ["PutResult", "Store", "StoreCorruptError"]


@dataclass
class PutResult:
    """What one put wrote. ``tokens`` = ``shared_tokens`` + ``new_tokens``."""

    session: str
    tokens: int  # the session's length
    shared_tokens: int  # its longest prefix already in the trie (stored once, not rewritten)
    new_tokens: int  # tokens after that prefix: written as a raw edge, coded at compaction
    split_edges: int  # stored edges cut in two because the session leaves them mid-way
    record_bytes: int  # bytes of the records this put wrote (edges and the session)
    replaced: bool = False  # a session of that id existed and was replaced


class _Blocked(Exception):
    """The trie changed under a writer and an edge must be decoded (outside the lock)."""


class Store:
    def __init__(self, db: str | Backend, lm: LoadedModel | None = None,
                 namespace: str = "default", *, create: bool = True,
                 chunk: int = DEFAULT_CHUNK, checkpoint_budget: int = 0,
                 checkpoint_policy: str | Policy = "prior",
                 checkpoint_quant: tuple[str, float] | None = None) -> None:
        """Open the store ``db`` (a path, a ``redis://`` URL, or an open backend). Without a
        model only model-free operations work (raw edges, delete, stats); ``create=False``
        refuses a store that does not exist yet instead of creating it.
        ``checkpoint_budget``: bytes for the hot tiers that ``rebalance`` fills, KV checkpoints
        and edges kept raw (0: none, every edge coded); ``checkpoint_policy``: ``"prior"``,
        ``"lru"`` or a ``policies.Policy``; ``checkpoint_quant``: (method, bits) of
        ``seqkv.quant`` for the checkpoints' KV (None: the model's dtype, raw)."""
        if not namespace or not isinstance(namespace, str):
            raise StoreError("the namespace must be a non-empty string")
        self.backend = open_backend(db, create=create) if isinstance(db, str) else db
        self.lm, self.ns = lm, namespace
        policy = (policy_by_name(checkpoint_policy) if isinstance(checkpoint_policy, str)
                  else checkpoint_policy)
        self.checkpoints = CheckpointManager(self, checkpoint_budget, policy, checkpoint_quant)
        self.chunk = self._check_meta(chunk, create)
        self.trie = Trie(encode_intervals)
        self.session_info: dict[str, dict] = {}
        self._gen = -1
        self.last_restore: dict = {}
        self.decoded_tokens = 0  # tokens of coded edges this process decoded with the model
        # held around every model call (a server shares one model between threads)
        self.model_lock: AbstractContextManager = nullcontext()

    # -- store-wide meta -------------------------------------------------------------------
    def _profile(self, chunk: int, procedure: str, lm: LoadedModel | None = None) -> dict:
        """What the store's coded edges depend on: for the engine its version and integer
        weights; for the lockstep fallback the whole float numerics profile."""
        lm = lm or self.lm
        if procedure == ENGINE_PROCEDURE:
            return {"procedure": procedure, "engine": ENGINE_ID,
                    "weights": lm.engine().digest[:8].hex(), "chunk": chunk}
        p = numerics_profile(lm, 1).to_dict()
        return {**p, "procedure": PROCEDURE, "chunk": chunk}

    def _check_meta(self, chunk: int, create: bool = True) -> int:
        raw = self.backend.read(META_NS, "meta", "store")
        if raw is not None:
            meta, _ = parse("meta", "store", raw)
            if int(meta.get("format", 1)) > STORE_FORMAT:  # a later seqkv's: refuse by name
                raise StoreError(f"the store at {self.backend.url} has format "
                                 f"{meta['format']}, newer than this seqkv reads "
                                 f"({STORE_FORMAT}): upgrade seqkv")
            self.procedure = str(meta["numerics"].get("procedure", PROCEDURE))
            self.vocab = meta.get("vocab")  # absent in stores of earlier seqkv versions
            if self.lm is not None:
                self._check_model(self.lm, meta)
            return int(meta["numerics"]["chunk"])
        if self.lm is None or not create:
            raise NoStoreError(f"no seqkv store at {self.backend.url} (put a session first)")
        procedure = procedure_for(self.lm)
        if procedure == ENGINE_PROCEDURE:
            chunk = engine_chunk_size(self.lm, chunk)
        else:
            max_pos = getattr(self.lm.config.get_text_config(), "max_position_embeddings", None)
            chunk = min(chunk, int(max_pos) - 1) if max_pos else chunk
        # the vocabulary size lets a Store opened without the model check token ids (a
        # server takes puts of ids before its model has loaded)
        header = {"kind": "meta", "model": self.lm.fingerprint.to_dict(),
                  "numerics": self._profile(chunk, procedure), "format": STORE_FORMAT,
                  "vocab": self.lm.vocab_size}
        with self.backend.transaction(META_NS) as txn:
            if txn.read("meta", "store") is None:
                txn.put("meta", "store", pack(header, []))
        return self._check_meta(chunk)

    def _check_model(self, lm: LoadedModel, meta: dict) -> None:
        """Refuse a model other than the one the store was written with (ModelMismatchError)."""
        problem = lm.fingerprint.mismatch(meta["model"])
        if problem:
            raise ModelMismatchError(problem.replace("blob", "store"))
        if self.procedure == ENGINE_PROCEDURE and lm.engine() is None:
            raise ModelMismatchError("store was coded under the integer engine, which "
                                     "this model's architecture has no mapping for")
        mine = self._profile(int(meta["numerics"]["chunk"]), self.procedure, lm)
        problem = engine_mismatch(meta["numerics"].get("engine"), "store")
        if self.procedure == ENGINE_PROCEDURE and problem:
            raise ModelMismatchError(problem)
        for key, value in meta["numerics"].items():
            if mine.get(key) != value:
                raise ModelMismatchError(
                    f"store was written with numerics {key}={value!r}; "
                    f"this process has {key}={mine.get(key)!r}")

    def attach_model(self, lm: LoadedModel) -> None:
        """Give a Store opened without a model its model, once checked against the store's
        (a server opens its stores at once and loads the model in the background)."""
        raw = self.backend.read(META_NS, "meta", "store")
        if raw is None:
            raise NoStoreError(f"no seqkv store at {self.backend.url}")
        self._check_model(lm, parse("meta", "store", raw)[0])
        self.lm = lm

    def _need_model(self) -> LoadedModel:
        if self.lm is None:
            raise ModelNeededError("this operation needs the store's model")
        return self.lm

    # -- loading -----------------------------------------------------------------------------
    def _load(self, gen: int, records: dict[str, dict[str, bytes]]) -> None:
        """Rebuild the namespace's trie from all its records."""
        self.trie, self.session_info = load_trie(records, self.trie.nodes)
        self.checkpoints.load(records)
        self._gen = gen

    def _catch_up(self, gen: int, changes: dict[str, dict[str, bytes | None]]) -> None:
        """Apply what changed since our generation (the backend's change log) in place."""
        apply_changes(self.trie, self.session_info, changes)
        self.checkpoints.apply(changes)
        self._gen = gen

    def refresh(self) -> None:
        """Catch up if another writer committed since we last looked: only the records that
        changed are read (the backend's change log) and applied to the trie in memory; the
        namespace is read whole only the first time (or without a change log)."""
        gen = self.backend.generation(self.ns)
        if gen == self._gen:
            return
        delta = self.backend.changes(self.ns, self._gen, KINDS) if 0 <= self._gen < gen else None
        if delta is None:
            self._load(*self.backend.snapshot(self.ns, KINDS))
        else:
            self._catch_up(*delta)

    def _write(self, fn: Callable[..., R], prepare: Callable[[], None] | None = None) -> R:
        """Run fn(txn) inside a write transaction on an up-to-date trie; retry on conflict.
        ``prepare`` runs before each attempt, outside the transaction, on a fresh snapshot: the
        model work a write needs (decoding edges to match against) happens there, so the
        write lock is never held while the model runs; fn raises _Blocked if it finds the trie
        changed so that more decoding is needed. Inside the lock only the records changed since
        our last look are read, so a writer holds the lock for about its own writes."""
        for _ in range(WRITE_ATTEMPTS):
            if prepare is not None:
                self.refresh()
                prepare()
            try:
                with self.backend.transaction(self.ns, since=self._gen) as txn:
                    if txn.generation != self._gen:
                        since = self._gen
                        delta = txn.changes(since, KINDS) if 0 <= since < txn.generation else None
                        if delta is None:
                            self._load(txn.generation, {k: txn.read_kind(k) for k in KINDS})
                        else:
                            self._catch_up(txn.generation, delta)
                    result = fn(txn)
                self._gen = txn.generation + 1
                return result
            except _Blocked:
                # a batch's earlier items may have changed the trie in memory: re-read it all
                self._gen = -1
            except StoreConflict:
                self._gen = -1  # the in-memory trie holds uncommitted changes: re-read it all
            except (SessionExistsError, NoSessionError):
                raise  # refused before anything changed in memory
            except BaseException:
                self._gen = -1
                raise
        raise StoreBusyError("store busy, retry: too many concurrent writers changed the trie")

    # -- inputs ------------------------------------------------------------------------------
    def _ids(self, data: str | Sequence[int] | torch.Tensor) -> tuple[list[int], TextRecipe | None]:
        if isinstance(data, str):
            return encode_text(self._need_model().tokenizer, data)
        try:
            ids = data.reshape(-1).tolist() if torch.is_tensor(data) else [int(i) for i in data]
        except (TypeError, ValueError) as e:
            raise SeqkvError(f"token ids must be integers ({e})") from e
        if not ids:
            raise SeqkvError("nothing to store: zero tokens")
        vocab = self.vocab  # the model's, recorded in the store's meta
        if vocab is None:  # a store of an earlier version
            vocab = self._need_model().vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise SeqkvError(f"token id out of range for a vocabulary of {vocab}")
        return ids, None

    def _decode(self, node: Node, before: list[int]) -> None:
        """Decode a coded edge whose tokens are unknown, given its path's tokens ``before``."""
        lm = self._need_model()
        try:
            with self.model_lock:
                [(tokens, rows)] = decode_edges(lm, self.chunk, [(before, node.words, node.n)],
                                                self.procedure)
        except BlobError as e:
            raise StoreCorruptError(f"corrupt store record edge {node.id}: {e}") from e
        if edge_hash(tokens) != node.token_hash:
            raise StoreCorruptError(f"edge {node.id} decoded to tokens that do not match its "
                                    "hash (corrupt record, or other numerics)")
        node.tokens, node.intervals = tokens, rows
        self.decoded_tokens += node.n

    def _walk(self, ids: list[int]):
        """Match ids against the trie, decoding (with the model) edges the match stops in."""
        while True:
            m = self.trie.match(ids)
            if m.blocked is None:
                return m
            self._decode(m.blocked, ids[: m.blocked.start])

    # -- API ---------------------------------------------------------------------------------
    def put(self, session: str, data, cache=None, replace: bool = False) -> PutResult:
        """Store a session's tokens (ids or text); with ``cache`` (the DynamicCache of exactly
        these tokens) also offer it as a checkpoint at the session's node. Returns once the
        session is durable; its new tokens are coded by a later ``compact()``."""
        ids, recipe = self._ids(data)
        result = self._write(lambda txn: self._put_in(txn, session, ids, recipe, replace),
                             prepare=lambda: self._walk(ids))
        if cache is not None and self.budget > 0:
            self.checkpoint(session, cache)
        return result

    def put_many(self, items: Sequence[tuple[str, object, bool]]
                 ) -> list[PutResult | SeqkvError]:
        """Several puts ``(session, ids or text, replace)`` in one transaction (one commit, one
        fsync: a server's group commit of concurrent requests). Each item gets its PutResult,
        or the error that refused it alone (bad input, the session exists); the others are
        written all the same. Returns once all are durable."""
        out: list = [None] * len(items)
        todo = []
        for i, (session, data, replace) in enumerate(items):
            try:
                todo.append((i, session, *self._ids(data), replace))
            except SeqkvError as e:
                out[i] = e

        def work(txn) -> list:
            done = list(out)
            for i, session, ids, recipe, replace in todo:
                try:
                    done[i] = self._put_in(txn, session, ids, recipe, replace)
                except (SessionExistsError, StoreError) as e:  # refused before any change
                    done[i] = e
            return done

        def prepare() -> None:
            for _, _, ids, _, _ in todo:
                self._walk(ids)

        return self._write(work, prepare=prepare) if todo else out

    def put_exact(self, session: str, kv: KVCache, replace: bool = False, *,
                  predictor: str = "recompute", **predictor_params) -> PutResult:
        """The exact tier: store a cache computed elsewhere (a serving engine's bf16, fp16 or
        fp8 tensors) so that ``get_exact`` returns it bit for bit. Its tokens join the trie
        like any session's; its tensors are stored as residuals from ``predictor`` (the
        model's recomputation by default; arXiv 2604.15356 §4) in a kv-delta blob."""
        from ..delta import compress_kv

        ids, _ = self._ids(kv.input_ids)
        with self.model_lock:
            blob = compress_kv(kv, self._need_model(), predictor, tokens="external",
                               **predictor_params)

        def work(txn) -> PutResult:
            result = self._put_in(txn, session, ids, None, replace, exact_bytes=len(blob))
            txn.put("exact", session, blob)
            result.record_bytes += len(blob)
            return result

        return self._write(work, prepare=lambda: self._walk(ids))

    def _put_in(self, txn, session: str, ids: list[int], recipe: TextRecipe | None,
                replace: bool, exact_bytes: int = 0) -> PutResult:
        if not session or not isinstance(session, str):
            raise StoreError("the session id must be a non-empty string")
        if self.trie.match(ids).blocked is not None:
            raise _Blocked()
        replaced = session in self.trie.sessions
        if replaced:
            if not replace:
                raise SessionExistsError(f"session {session!r} exists (delete it first)")
            self._delete_in(txn, session)
        m = self.trie.match(ids)  # deleting only removed edges: the match is still unblocked
        node, changed, split = m.node, [], 0
        if m.offset < node.n:
            mid = self.trie.split(node, m.offset)
            changed += [mid, node]
            node, split = mid, 1
        if m.depth < len(ids):
            node = self.trie.add_child(node, ids[m.depth :])
            changed.append(node)
        written = 0
        for n in changed:
            record = pack_edge(n)
            txn.put("edge", n.id, record)
            written += len(record)
        self.trie.add_session(session, node)
        h = {"kind": "session", "node": node.id, "n": len(ids), "hash": token_hash(ids),
             "text": recipe.to_dict() if recipe is not None else None,
             "exact_bytes": exact_bytes}
        self.session_info[session] = h
        record = pack_session(h)
        txn.put("session", session, record)
        return PutResult(session, len(ids), m.depth, len(ids) - m.depth, split,
                         written + len(record), replaced)

    def _delete_in(self, txn, session: str) -> None:
        for n in self.trie.remove_session(session):
            txn.delete("edge", n.id)
            self.checkpoints.delete_in(txn, n.id)
        if (self.session_info.pop(session, None) or {}).get("exact_bytes"):
            txn.delete("exact", session)
        txn.delete("session", session)
        self.checkpoints.forget_session_in(txn, session)

    def delete(self, session: str) -> None:
        """Delete a session (no model needed); edges no other session uses are freed."""
        def work(txn):
            if session not in self.trie.sessions:
                raise NoSessionError(f"no session {session!r} in namespace {self.ns!r}")
            self._delete_in(txn, session)

        self._write(work)

    def sessions(self) -> list[str]:
        self.refresh()
        return sorted(self.trie.sessions)

    def has(self, session: str) -> bool:
        self.refresh()
        return session in self.trie.sessions

    def is_text(self, session: str) -> bool:
        """Whether the session was put as text (``get_text`` works), not as token ids."""
        self._session(session)
        return self.session_info[session].get("text") is not None

    def _session(self, session: str) -> Node:
        self.refresh()
        node = self.trie.sessions.get(session)
        if node is None:
            raise NoSessionError(f"no session {session!r} in namespace {self.ns!r}")
        return node

    def _path_ids(self, path: list[Node], ids: list[int] | None = None) -> tuple[list[int], int]:
        """The tokens of ``path`` (after ``ids``, the tokens above it): raw and known edges as
        they are, coded unknown ones decoded (only those need the model); and how many tokens
        were decoded."""
        ids, before = list(ids or []), self.decoded_tokens
        for e in path:
            if not e.known:
                self._decode(e, ids)
            ids.extend(e.tokens)
        return ids, self.decoded_tokens - before

    def _restore_ids(
        self, session: str, use_checkpoint: bool, count: bool = True
    ) -> tuple[list[int], tuple[int, dict, list[bytes]] | None]:
        path = self.trie.path(self._session(session))
        ckpt = self.checkpoints.deepest(path) if use_checkpoint else None
        return self._ids_below(session, path, *_below(ckpt), count), ckpt

    def _ids_below(self, session: str, path: list[Node], begin: int, above: list[int],
                   count: bool) -> list[int]:
        """The session's ids: ``above`` (a checkpoint's, or none) and those of the path's
        edges from index ``begin`` on, checked against the session's hash."""
        ids, decoded = self._path_ids(path[begin:], above)
        if token_hash(ids) != self.session_info[session]["hash"]:
            raise StoreCorruptError(f"session {session!r} decoded to tokens that do not match "
                                    "its hash")
        if count:  # one restore for the tier policy (a caller's second look does not count)
            self.checkpoints.touch(session)
        self.last_restore = {"decoded_tokens": decoded,
                             "checkpoint_depth": path[begin - 1].depth if begin else 0}
        return ids

    def get_many(self, sessions: Sequence[str],
                 use_checkpoint: bool | Sequence[bool] = False) -> list[list[int] | SeqkvError]:
        """Several sessions' token ids at once (concurrent requests): the coded edges not yet
        decoded in this process are decoded together, in lockstep rounds of every session's
        next edge (an edge needs the tokens above it as context; ``_decode_paths``). A
        session that does not exist gets its NoSessionError. ``use_checkpoint`` (for all, or
        per session): start below the session's deepest KV checkpoint, whose ids it holds, so
        the edges above it need no decoding (a cache restore starts there anyway)."""
        self.refresh()
        flags = ([use_checkpoint] * len(sessions) if isinstance(use_checkpoint, bool)
                 else list(use_checkpoint))
        out: list = []
        starts: dict[int, tuple[list[Node], int, list[int]]] = {}  # path, begin, ids above
        for name, flag in zip(sessions, flags, strict=True):
            node = self.trie.sessions.get(name)
            out.append(None if node is not None else
                       NoSessionError(f"no session {name!r} in namespace {self.ns!r}"))
            if node is not None:
                path = self.trie.path(node)
                try:  # (read once: its ids are the context below it, then the answer's head)
                    starts[len(out) - 1] = (path, *_below(self.checkpoints.deepest(path)
                                                          if flag else None))
                except SeqkvError as e:  # an unreadable checkpoint: this session's answer
                    out[-1] = e
        self._decode_paths([(path[begin:], above) for path, begin, above in starts.values()])
        for i, (path, begin, above) in starts.items():
            try:
                out[i] = self._ids_below(sessions[i], path, begin, above, count=True)
            except SeqkvError as e:
                out[i] = e
        return out

    def _decode_paths(self, paths: list[tuple[list[Node], list[int]]]) -> None:
        """Decode the unknown coded edges of ``paths`` (each: edges, and the ids above the
        first of them) in rounds, each round's edges (of every path) as one lockstep batch
        through the model seam. An edge needs the tokens above it as context, so a round
        takes each path's first unknown edge; and since a lockstep round lasts as long as its
        longest edge, edges that others wait on go first, with only the leaves that fit in
        their round (a short shared prefix above many long sessions costs a few steps, not a
        second full round)."""
        while True:
            jobs: dict[str, tuple[Node, list[int]]] = {}
            blocking: set[str] = set()
            for path, above in paths:  # edges, and the ids above the first of them
                before = list(above)
                for i, e in enumerate(path):
                    if not e.known:
                        jobs.setdefault(e.id, (e, before))
                        if any(not below.known for below in path[i + 1 :]):
                            blocking.add(e.id)
                        break
                    before = before + e.tokens
            if not jobs:
                return
            if blocking:
                longest = max(jobs[i][0].n for i in blocking)
                jobs = {i: job for i, job in jobs.items()
                        if i in blocking or job[0].n <= longest}
            lm = self._need_model()
            todo = list(jobs.values())
            longest = max(len(above) + sum(e.n for e in path) for path, above in paths)
            try:
                with self.model_lock:
                    rows = decode_edges(lm, self.chunk, [(b, e.words, e.n) for e, b in todo],
                                        self.procedure, path_tokens=longest)
            except BlobError as e:
                raise StoreCorruptError(f"corrupt store record edge: {e}") from e
            for (node, _), (tokens, r) in zip(todo, rows, strict=True):
                if edge_hash(tokens) != node.token_hash:
                    raise StoreCorruptError(f"edge {node.id} decoded to tokens that do not "
                                            "match its hash (corrupt record, or other numerics)")
                node.tokens, node.intervals = tokens, r
                self.decoded_tokens += node.n

    def get_ids(self, session: str, use_checkpoint: bool = True,
                count: bool = True) -> list[int]:
        """A session's token ids (the model is needed only for coded edges)."""
        return self._restore_ids(session, use_checkpoint, count)[0]

    def get_text(self, session: str) -> str:
        return self.text_of(session, self.get_ids(session))

    def text_of(self, session: str, ids: list[int]) -> str:
        """The text of a session stored as text, from its ids (already restored)."""
        recipe = self.session_info[session].get("text")
        if recipe is None:
            raise StoreError(f"session {session!r} holds token ids, not text")
        return decode_text(self._need_model().tokenizer, ids, TextRecipe.from_dict(recipe))

    def get_cache(self, session: str, use_checkpoint: bool = True,
                  count: bool = True) -> RestoredCache:
        """The session's KV cache: from its deepest checkpoint plus a prefill of the rest.
        ``count``: whether this counts as a restore for the tier policy."""
        lm = self._need_model()
        ids, ckpt = self._restore_ids(session, use_checkpoint, count)
        with self.model_lock:
            if ckpt is None:
                return prefill_cache(lm.model, ids)
            return self.checkpoints.restore(ckpt[1], ckpt[2], ids)

    def get_exact(self, session: str) -> KVCache:
        """A session put with ``put_exact``: the very tensors that were put, bit for bit."""
        from ..delta import decompress_kv

        self._session(session)
        if not self.session_info[session].get("exact_bytes"):
            raise StoreError(f"session {session!r} was not stored exactly (put it with a cache)")
        ids = self.get_ids(session)
        blob = self.backend.read(self.ns, "exact", session)
        if blob is None:
            raise StoreCorruptError(f"corrupt store: session {session!r} lost its exact record")
        try:
            with self.model_lock:
                return decompress_kv(blob, self._need_model(), ids=ids)
        except BlobError as e:
            raise StoreCorruptError(f"corrupt store record exact {session}: {e}") from e

    # -- tiers: checkpoints and raw edges (checkpoints.py; which nodes: policies.py) ------
    @property
    def ckpts(self) -> dict[str, dict]:
        return self.checkpoints.meta

    @property
    def budget(self) -> int:
        return self.checkpoints.budget

    def checkpoint_size(self, depth: int) -> int:
        """The estimated bytes of a checkpoint at a node of ``depth`` tokens (the size the
        policy budgets with)."""
        return self.checkpoints.kv_bytes(depth)

    def checkpoint(self, target: str, cache=None) -> int:
        """Materialize a checkpoint at a session's node (or a node id); returns its bytes."""
        return self.checkpoints.checkpoint(target, cache)

    def drop_checkpoint(self, node_id: str) -> None:
        self.checkpoints.drop(node_id)

    def candidates(self) -> dict[str, NodeInfo]:
        """Every node as the tier policy sees it (``policies.NodeInfo``)."""
        return self.checkpoints.candidates()

    def tiers(self) -> dict[str, Tier]:
        """Each node's tier now: checkpoint, raw (kept raw by the policy); absent: coded, or
        raw pending compaction."""
        self.refresh()
        return self.checkpoints.tiers()

    def rebalance(self, accessed: str | None = None) -> dict:
        """Let the policy pick each node's tier (checkpoint, raw, coded) under the byte budget:
        materialize and drop checkpoints, keep the hot edges raw, release the cooled ones to
        the next compaction. ``accessed``: the session a restore just read (LRU admits it)."""
        return self.checkpoints.rebalance(accessed)

    # -- queries -----------------------------------------------------------------------------
    def stats(self) -> dict:
        self.refresh()
        tokens_total = sum(int(h["n"]) for h in self.session_info.values())
        pending = self.trie.pending()
        raw_tokens = sum(n.n for n in pending)
        kept = [n for n in pending if n.id in self.checkpoints.raw]
        out = {
            "namespace": self.ns,
            "sessions": len(self.trie.sessions),
            "tokens_total": tokens_total,
            "tokens_unique": self.trie.tokens_unique,
            "edges": sum(1 for _ in self.trie.edges()),
            "bits_total": self.trie.bits_total,  # coded edges' streams
            "bits_per_unique_token":  # over coded tokens (raw ones are not coded yet)
                self.trie.bits_total / max(self.trie.tokens_unique - raw_tokens, 1),
            "raw_edges": len(pending),  # written by put, pending compaction, or kept raw
            "raw_tokens": raw_tokens,
            "raw_bytes": 4 * raw_tokens,
            "raw_kept_edges": len(kept),  # kept raw by the tier policy (compaction leaves them)
            "raw_kept_bytes": 4 * sum(n.n for n in kept),
            "checkpoints": len(self.ckpts),
            "checkpoint_bytes": self.checkpoints.bytes,
            "exact_sessions": sum(1 for h in self.session_info.values() if h.get("exact_bytes")),
            "exact_bytes": sum(int(h.get("exact_bytes") or 0) for h in self.session_info.values()),
            "chunk": self.chunk,
        }
        if self.lm is not None:
            cfg = self.lm.config
            out["fp16_kv_bits_total"] = fp16_kv_bits(cfg, 1) * tokens_total
            out["turboquant3_kv_bits_total"] = turboquant_kv_bits(cfg, 1, 3) * tokens_total
        return out

    def nearest(self, data, k: int = 10) -> list[dict]:
        """Stored sessions ranked by d_T = -log2 P_M(s ^ query), the information of the longest
        common prefix under the model (most shared information first), with its token count."""
        ids, _ = self._ids(data)
        self.refresh()
        m = self._walk(ids)
        path = self.trie.path(m.node)
        self._intervals(path)
        on_path = {n.id: n for n in path}
        cum, total = {"root": (0, 0.0)}, 0.0
        for n in path:
            upto = n.n if n is not m.node else m.offset
            total += n.info_bits(upto)
            cum[n.id] = (n.start + upto, total)
        rows = []
        for name, node in self.trie.sessions.items():
            a = node
            while a is not self.trie.root and a.id not in on_path:
                a = a.parent
            shared, bits = cum[a.id]
            rows.append({"session": name, "shared_tokens": shared, "d_T_bits": round(bits, 3),
                         "session_tokens": int(self.session_info[name]["n"])})
        rows.sort(key=lambda r: (-r["d_T_bits"], -r["shared_tokens"], r["session"]))
        return rows[:k]

    def _intervals(self, path: list[Node]) -> None:
        """Fill in the per-token intervals of a path's edges whose tokens are known but whose
        intervals are not (raw edges, edges matched by their hash): the model codes them."""
        jobs, todo, ids = [], [], []
        for e in path:
            if e.intervals is None:
                jobs.append((list(ids), e.tokens))
                todo.append(e)
            ids.extend(e.tokens)
        if jobs:
            with self.model_lock:
                rows = encode_edges(self._need_model(), self.chunk, jobs, self.procedure)
            for e, r in zip(todo, rows, strict=True):
                e.intervals = r

    def compact(self, batch: int = DEFAULT_BATCH, max_rounds: int = 10_000) -> CompactResult:
        """Code the namespace's pending raw edges under the model, ``batch`` edges a round,
        each swapped raw -> coded atomically by compare-and-swap (see ``compaction.py``)."""
        return compact(self, batch, max_rounds)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _below(ckpt: tuple[int, dict, list[bytes]] | None) -> tuple[int, list[int]]:
    """Where a path's restore starts given its deepest checkpoint (``CheckpointManager.deepest``
    or None): the index of the first edge below it, and the ids it holds."""
    if ckpt is None:
        return 0, []
    return ckpt[0] + 1, np.frombuffer(ckpt[2][0], dtype="<u4").astype(np.int64).tolist()
