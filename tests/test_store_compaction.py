"""Compaction: raw edges coded later (same bytes as coding them directly), swapped by
compare-and-swap (a concurrent split or delete is never overwritten), idempotent, and safe
under kill -9 at any moment; puts in a fresh process match coded edges without the model
where they can, and never run the model under the write lock."""

import os
import random
import signal
import time

import numpy as np
import pytest

from seqkv.store import Store
from seqkv.store import coding as coding_mod
from seqkv.store import compaction as compaction_mod
from seqkv.store.coding import ENGINE_PROCEDURE, encode_edges, encode_intervals

from .test_store_backends import (  # noqa: F401 - the db fixture
    CHUNK,
    PAUSE_ENV,
    PAUSE_HOOK,
    db,
    seqs,
    spawn_script,
    wait_for,
)


def path_tokens(store, node):
    return [t for e in store.trie.path(node) for t in e.tokens]


def check_store(db_url, lm, data):
    """Every session reads back in a fresh process-like store; every edge once."""
    fresh = Store(db_url, lm)
    assert fresh.sessions() == sorted(data)
    for k, v in data.items():
        assert fresh.get_ids(k) == v
    prefixes = {tuple(v[: i + 1]) for v in data.values() for i in range(len(v))}
    assert fresh.stats()["tokens_unique"] == len(prefixes)
    return fresh


def test_compact_codes_edges_as_direct_coding_would(db, llama):  # noqa: F811
    data = seqs(7)
    s = Store(db, llama, chunk=CHUNK)
    for k, v in data.items():
        s.put(k, v)
    raw = s.stats()
    assert raw["bits_total"] == 0 and raw["raw_edges"] == raw["edges"] > 1
    r = s.compact(batch=3)
    assert (r.edges, r.tokens, r.skipped, r.pending) == (raw["edges"], raw["tokens_unique"], 0, 0)
    assert r.rounds == -(-raw["edges"] // 3) and r.raw_bits == 32 * r.tokens
    st = s.stats()
    assert st["raw_edges"] == 0 and st["bits_total"] == r.coded_bits > 0
    fresh = check_store(db, llama, data)  # coded edges decoded from their bits
    assert fresh.procedure == ENGINE_PROCEDURE  # the integer engine codes Llama stores
    for node in fresh.trie.edges():  # one rANS stream per edge, as coding one edge alone gives
        before = path_tokens(fresh, node)[: node.start]
        [rows] = encode_edges(llama, CHUNK, [(before, node.tokens)], ENGINE_PROCEDURE)
        assert np.array_equal(node.words, encode_intervals(rows))
    again = fresh.compact()  # idempotent
    assert (again.edges, again.pending) == (0, 0)
    assert Store(db, llama).stats()["bits_total"] == st["bits_total"]


def test_fresh_process_put_uses_token_hashes_and_never_codes_under_the_lock(
        db, llama, monkeypatch):  # noqa: F811
    base = seqs(8)["s0"]
    s = Store(db, llama, chunk=CHUNK)
    s.put("a", base)
    s.compact()
    fresh, fresh2 = Store(db, llama), Store(db, llama)
    calls = []

    def watch(real):
        def wrapper(lm, chunk, jobs, *procedure):
            calls.append(len(jobs))
            for st in (fresh, fresh2):
                con = getattr(st.backend, "con", None)
                assert con is None or not con.in_transaction, "the model ran under the lock"
            return real(lm, chunk, jobs, *procedure)
        return wrapper

    monkeypatch.setattr("seqkv.store.store.decode_edges", watch(coding_mod.decode_edges))
    monkeypatch.setattr("seqkv.store.store.encode_edges", watch(coding_mod.encode_edges))
    r = fresh.put("b", base + [9, 9])  # passes a's whole coded edge: matched by its hash
    assert (r.shared_tokens, r.new_tokens, calls) == (len(base), 2, [])
    r = fresh2.put("c", base[:5] + [11])  # leaves it mid-way: decoded, outside the lock
    assert (r.shared_tokens, r.split_edges, calls) == (5, 1, [1])
    st = fresh2.stats()  # the decoded edge's intervals were known: both halves re-coded
    assert st["raw_edges"] == 2 and st["raw_tokens"] == 2 + 1  # only b's and c's new tokens
    fresh.compact()
    check_store(db, llama, {"a": base, "b": base + [9, 9], "c": base[:5] + [11]})


def test_compare_and_swap_leaves_concurrent_split_and_delete_alone(db, llama, monkeypatch):  # noqa: F811, E501
    data = seqs(9, n=3)
    s = Store(db, llama, chunk=CHUNK)
    for k, v in data.items():
        s.put(k, v)
    other = Store(db, llama)
    victim, leaf = data["s0"], s.trie.sessions["s0"]
    assert leaf.n >= 2 and leaf.raw
    cut = leaf.start + leaf.n // 2  # inside the last (raw) edge of s0's path
    late = victim[:cut] + [3 if victim[cut] != 3 else 4, 5]
    real = compaction_mod.encode_edges
    rounds = []

    def racing(lm, chunk, jobs, *procedure):
        if not rounds:  # while the batch is being coded, another writer splits and deletes
            other.put("late", late)
            other.delete("s1")
        rounds.append(len(jobs))
        return real(lm, chunk, jobs, *procedure)

    monkeypatch.setattr(compaction_mod, "encode_edges", racing)
    r = s.compact(batch=100)
    assert r.skipped >= 2 and r.pending == 0 and len(rounds) >= 2
    expected = {"s0": data["s0"], "s2": data["s2"], "late": late}
    fresh = check_store(db, llama, expected)
    assert fresh.stats()["raw_edges"] == 0


_COMPACTOR = PAUSE_HOOK + """
import sys, pathlib
sys.path.insert(0, {tests!r})
from conftest import tiny_llama
from seqkv.store import Store
s = Store({db!r}, tiny_llama())
pathlib.Path({started!r}).write_text("go")
s.compact(batch={batch})
"""


def _spawn_compactor(db_url, tmp_path, batch, env=None):
    started = tmp_path / f"started-{random.random()}"
    return spawn_script(_COMPACTOR, env, db=db_url, batch=batch, started=str(started)), started


def test_kill_9_during_compaction_loses_nothing_and_the_next_run_continues(
        db, llama, tmp_path):  # noqa: F811
    data = seqs(10, n=8)
    s = Store(db, llama, chunk=CHUNK)
    for k, v in data.items():
        s.put(k, v)
    edges = s.stats()["edges"]
    # 1: killed while its first swap transaction is about to commit
    marker = tmp_path / "paused"
    p, _ = _spawn_compactor(db, tmp_path, 2, {PAUSE_ENV: str(marker),
                                              "SEQKV_REDIS_LOCK_TTL": "2"})
    wait_for(p, marker, 90)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    st = check_store(db, llama, data).stats()
    assert st["raw_edges"] == st["edges"] == edges  # nothing committed, nothing lost
    # 2: killed at a random moment of a one-edge-per-round run
    p, started = _spawn_compactor(db, tmp_path, 1)
    wait_for(p, started, 90)
    time.sleep(random.uniform(0.0, 0.4))
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    st = check_store(db, llama, data).stats()
    assert st["edges"] == edges and 0 <= st["raw_edges"] <= edges
    # 3: the next run codes what is left, and the store holds every session exactly once
    r = Store(db, llama).compact()
    assert r.pending == 0 and r.edges == st["raw_edges"]
    assert check_store(db, llama, data).stats()["raw_edges"] == 0


def test_compaction_needs_the_model(db, llama):  # noqa: F811
    Store(db, llama, chunk=CHUNK).put("a", [5, 6, 7])
    with pytest.raises(Exception, match="needs the store's model"):
        Store(db, None).compact()
