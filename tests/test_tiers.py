"""Tiers per trie node (checkpoint, raw, coded) chosen under one byte budget: the policies'
choices (budget never exceeded, nothing hot without a budget, hot nodes raw before cold ones),
and the store acting on them (a policy-raw edge survives compaction, a hot coded edge is
swapped back to raw, a cooled one is coded again; every session back exactly; a kill -9
during the swap loses nothing)."""

import os
import random
import signal
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from seqkv.store import Store
from seqkv.store import compaction as compaction_mod
from seqkv.store.policies import (
    LRUPolicy,
    NodeInfo,
    PriorGuidedPolicy,
    Tier,
    tiers_bytes,
)

from .test_store_backends import (  # noqa: F401 - the db fixture
    CHUNK,
    PAUSE_ENV,
    PAUSE_HOOK,
    db,
    spawn_script,
    wait_for,
)


# -- the policies ------------------------------------------------------------------------------
@st.composite
def tries(draw):
    """A random trie as the policy sees it: each node below a random earlier one."""
    count = draw(st.integers(1, 12))
    nodes: dict[str, NodeInfo] = {}
    for k in range(count):
        parent = draw(st.sampled_from([None, *nodes])) if nodes else None
        n = draw(st.integers(1, 40))
        above = [*nodes[parent].ancestors, parent] if parent else []
        depth = (nodes[parent].depth if parent else 0) + n
        ckpt = draw(st.booleans()) and depth >= 16
        nodes[f"n{k}"] = NodeInfo(
            f"n{k}", depth, draw(st.integers(100, 5000)) if ckpt else 0,
            refs=draw(st.integers(1, 6)), bits=depth * draw(st.floats(0.5, 16.0)),
            hits=draw(st.integers(0, 20)), last=float(draw(st.integers(0, 50))),
            ancestors=above, n=n, checkpointable=ckpt)
    return nodes


def _valid(nodes, out):
    for i, t in out.items():
        assert t in (Tier.CHECKPOINT, Tier.RAW)
        assert t is not Tier.CHECKPOINT or nodes[i].checkpointable


@settings(max_examples=150, deadline=None)
@given(tries(), st.integers(0, 20_000), st.data())
def test_tiers_never_exceed_the_budget(nodes, budget, data):
    ids = sorted(nodes)
    for policy in (LRUPolicy(), PriorGuidedPolicy()):
        current: dict[str, Tier] = {}
        for _ in range(4):  # a few restores, each followed by a re-selection
            accessed = data.draw(st.sampled_from([None, *ids]))
            out = policy.tiers(nodes, current, accessed, budget)
            _valid(nodes, out)
            assert tiers_bytes(nodes, out) <= budget
            current = out
        assert policy.tiers(nodes, current, ids[0], 0) == {}  # no budget: everything coded
        assert policy.select(nodes, set(), ids[0], budget) <= {
            i for i, n in nodes.items() if n.checkpointable}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=2, max_size=10), st.integers(1, 9))
def test_prior_keeps_hot_edges_raw_before_cold_ones(hits, k):
    """Leaves of equal length and prior, differing in observed hits; room for k of them raw."""
    nodes = {f"e{i}": NodeInfo(f"e{i}", 8, 0, refs=1, bits=40.0, hits=h, n=8,
                               checkpointable=False) for i, h in enumerate(hits)}
    out = PriorGuidedPolicy().tiers(nodes, {}, None, 32 * k)
    raw = {i for i, t in out.items() if t is Tier.RAW}
    assert len(raw) == min(k, len(hits))
    cold = [nodes[i].hits for i in nodes if i not in raw]
    assert all(nodes[i].hits >= max(cold, default=0) for i in raw)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=30), st.integers(1, 9))
def test_lru_keeps_the_most_recent_edges_raw(trace, k):
    nodes = {f"e{i}": NodeInfo(f"e{i}", 8, 0, refs=1, bits=40.0, n=8, checkpointable=False)
             for i in range(10)}
    current: dict[str, Tier] = {}
    for clock, i in enumerate(trace, 1):
        nodes[f"e{i}"].last = clock
        current = LRUPolicy().tiers(nodes, current, f"e{i}", 32 * k)
    recent = list(dict.fromkeys(reversed(trace)))[:k]
    assert current == {f"e{i}": Tier.RAW for i in recent}


def test_raw_tier_first_then_checkpoints_where_they_save_more():
    """A 64-token shared prompt (two edges) under 3 sessions: small budgets keep its edges raw
    (a decode step saved per 4 bytes); a larger one adds the checkpoint, which also saves the
    prefill, upgrading the raw node in place."""
    nodes = {
        "p1": NodeInfo("p1", 32, 0, refs=3, bits=64.0, n=32, checkpointable=False),
        "p2": NodeInfo("p2", 64, 9000, refs=3, bits=128.0, ancestors=["p1"], n=32),
        "leaf": NodeInfo("leaf", 80, 11000, refs=1, bits=300.0, ancestors=["p1", "p2"], n=16),
    }
    prior = PriorGuidedPolicy(decode_cost=1.0, prefill_cost=0.1, load_cost=0.0)
    assert prior.tiers(nodes, {}, None, 0) == {}
    assert prior.tiers(nodes, {}, None, 128) == {"p1": Tier.RAW}
    assert prior.tiers(nodes, {}, None, 256) == {"p1": Tier.RAW, "p2": Tier.RAW}
    out = prior.tiers(nodes, {}, None, 9000 + 128 + 64)
    assert out == {"p1": Tier.RAW, "p2": Tier.CHECKPOINT, "leaf": Tier.RAW}
    assert tiers_bytes(nodes, out) == 9000 + 128 + 64


def test_lru_three_tiers_demotes_the_least_recent_one_tier():
    nodes = {
        "a": NodeInfo("a", 32, 5000, refs=1, bits=99.0, last=1.0, n=32),
        "b": NodeInfo("b", 32, 5000, refs=1, bits=99.0, last=2.0, n=32),
    }
    out = LRUPolicy().tiers(nodes, {}, "a", 6000)
    assert out == {"a": Tier.CHECKPOINT}
    out = LRUPolicy().tiers(nodes, out, "b", 6000)  # a demoted to raw, b checkpointed
    assert out == {"a": Tier.RAW, "b": Tier.CHECKPOINT}
    # a tight budget: the older entry goes first (raw -> coded), then b's checkpoint -> raw
    assert LRUPolicy().tiers(nodes, out, None, 256) == {"b": Tier.RAW}


# -- the store ---------------------------------------------------------------------------------
PROMPT = [3 + (7 * i) % 300 for i in range(24)]


def _data():
    hot = {f"hot{i}": PROMPT + [10 + i] + [50 + 3 * i + j for j in range(6)] for i in range(3)}
    cold = {f"cold{i}": [200 + i] + [100 + 5 * i + j for j in range(12)] for i in range(3)}
    return {**hot, **cold}


def _check(db_url, lm, data):
    """Every session back exactly in a fresh process-like store."""
    fresh = Store(db_url, lm)
    assert fresh.sessions() == sorted(data)
    for k, v in data.items():
        assert fresh.get_ids(k) == v
    return fresh


def _coded_store(db_url, lm):
    data = _data()
    s = Store(db_url, lm, chunk=CHUNK)
    for k, v in data.items():
        s.put(k, v)
    s.compact()
    return s, data


def test_hot_edges_swapped_to_raw_kept_through_compaction_and_coded_once_cool(db, llama):  # noqa: F811, E501
    s, data = _coded_store(db, llama)
    coded = s.stats()
    assert coded["raw_edges"] == 0
    hot_tokens = sum(n.n for n in s.trie.path(s.trie.sessions["hot0"]))
    budget = 4 * hot_tokens  # the hot path's edges raw; no room for a checkpoint
    assert budget < s.checkpoint_size(16)
    t = Store(db, llama, checkpoint_budget=budget, checkpoint_policy="lru")  # fresh: unknown
    for _ in range(2):
        assert t.get_ids("hot0") == data["hot0"]
    out = t.rebalance("hot0")
    hot_path = [n.id for n in t.trie.path(t.trie.sessions["hot0"])]
    assert sorted(out["raw"]) == sorted(hot_path) and out["raw_swapped"] == len(hot_path)
    assert out["kept"] == [] and out["policy_bytes"] == out["raw_bytes"] == budget
    st = t.stats()
    assert (st["raw_kept_edges"], st["raw_kept_bytes"]) == (len(hot_path), budget)
    assert st["bits_total"] < coded["bits_total"]
    r = Store(db, llama).compact()  # another process: leaves the policy's raw edges alone
    assert (r.edges, r.pending, r.kept_raw) == (0, 0, len(hot_path))
    assert _check(db, llama, data).tiers() == {i: "raw" for i in hot_path}
    fresh = Store(db, llama)
    assert fresh.get_ids("hot1") == data["hot1"]  # through the raw prompt edge: only its
    assert fresh.decoded_tokens == len(data["hot1"]) - len(PROMPT)  # own edge is decoded
    # they cool: another session is hot now (a budget for its edge alone, so LRU demotes
    # both); the next compaction codes them
    t = Store(db, llama, checkpoint_budget=4 * 13, checkpoint_policy="lru")
    t.get_ids("cold0")
    out = t.rebalance("cold0")
    cold_path = {n.id for n in t.trie.path(t.trie.sessions["cold0"])}
    assert set(out["raw"]) == cold_path and set(out["raw_dropped"]) == set(hot_path)
    r = Store(db, llama).compact()
    assert r.edges == len(hot_path) and r.kept_raw == len(cold_path) and r.pending == 0
    # no budget: nothing kept raw, everything coded again, to the very bits it had
    assert Store(db, llama, checkpoint_budget=0).rebalance()["raw"] == []
    Store(db, llama).compact()
    fresh = _check(db, llama, data)
    assert fresh.tiers() == {}
    assert fresh.stats()["bits_total"] == coded["bits_total"]
    assert fresh.stats()["raw_edges"] == 0


def test_restore_counts_are_shared_between_processes_and_survive_a_restart(db, llama):  # noqa: F811, E501
    """Two stores on one database (two servers) rank nodes by every process's restores: what
    one counted reaches the other at its next rebalance, a process started later sees it all,
    and a deleted session's counts go with its node."""
    _, data = _coded_store(db, llama)
    a, b = (Store(db, llama, checkpoint_budget=4 * 13, checkpoint_policy="lru")
            for _ in range(2))
    for _ in range(3):
        assert a.get_ids("cold1") == data["cold1"]
    a.rebalance()
    node = a.trie.sessions["cold1"].id
    b.get_ids("cold1")
    b.rebalance()
    assert b.candidates()[node].hits == 4  # a's three and b's own
    later = Store(db, llama, checkpoint_budget=4 * 13)  # prior-guided, no restore of its own
    out = later.rebalance()
    assert later.candidates()[node].hits == 4 and out["raw"] == [node]
    later.delete("cold1")
    assert later.backend.read(later.ns, "hits", "cold1") is None
    assert node not in Store(db, llama, checkpoint_budget=1 << 20).candidates()


def test_a_replaced_session_does_not_inherit_the_old_contents_restores(db, llama):  # noqa: F811, E501
    """As in a server: a reading Store counts restores of x, a writing Store replaces x with
    other tokens, and the rebalancing Store takes the reader's counts: none of them passes to
    the new x (nor does the record of an earlier merge)."""
    _, data = _coded_store(db, llama)
    reader, writer = Store(db, llama), Store(db, llama)
    tiers = Store(db, llama, checkpoint_budget=1 << 20)
    for _ in range(2):
        reader.get_ids("cold2")
    tiers.checkpoints.absorb(reader.checkpoints)
    tiers.rebalance()
    assert tiers.candidates()[tiers.trie.sessions["cold2"].id].hits == 2
    for _ in range(3):
        reader.get_ids("cold2")
    writer.put("cold2", data["cold2"][:5] + [9, 9, 9], replace=True)
    tiers.checkpoints.absorb(reader.checkpoints)
    tiers.rebalance()
    assert tiers.candidates()[tiers.trie.sessions["cold2"].id].hits == 0
    assert tiers.backend.read(tiers.ns, "hits", "cold2") is None


def test_restore_counts_follow_a_split_and_a_corrupt_count_is_no_count(db, llama):  # noqa: F811, E501
    """An edge split by a later put (here by another process, as a server's writer does):
    its new upper half carries the restores that went through the edge. A count record that
    fails its checksum counts as none and is written afresh, instead of stopping the tier
    policy."""
    s = Store(db, llama, chunk=CHUNK, checkpoint_budget=1 << 20)
    s.put("a", list(range(10, 40)))
    for _ in range(3):
        s.get_ids("a")
    s.rebalance()
    whole = s.trie.sessions["a"].id
    Store(db, llama, chunk=CHUNK).put("b", list(range(10, 25)) + [7, 8, 9])  # splits a's edge
    t = Store(db, llama, chunk=CHUNK, checkpoint_budget=1 << 20)
    t.rebalance()
    upper = t.trie.sessions["a"].parent
    assert upper.id != whole and t.trie.sessions["a"].id == whole
    assert t.candidates()[upper.id].hits == t.candidates()[whole].hits == 3
    t.get_ids("b")
    t.rebalance()
    assert t.candidates()[upper.id].hits == 4 and t.candidates()[whole].hits == 3
    with t.backend.transaction(t.ns) as txn:
        txn.put("hits", "a", b"not a record")
    t.get_ids("a")
    t.rebalance()  # no error: the bad record counts as none, then holds this restore
    assert t.candidates()[whole].hits == 1 and t.candidates()[upper.id].hits == 2


def test_prior_guided_store_keeps_the_shared_prompt_raw_and_checkpoints_it(db, llama):  # noqa: F811, E501
    s, data = _coded_store(db, llama)
    prompt_node = s.trie.sessions["hot0"].parent
    assert prompt_node.depth == len(PROMPT)
    budget = 4 * len(PROMPT)
    p = Store(db, llama, checkpoint_budget=budget)  # prior-guided, no restore yet
    out = p.rebalance()
    assert out["raw"] == [prompt_node.id] and out["kept"] == []  # 3 sessions share it
    assert p.trie.nodes[prompt_node.id].raw and out["raw_swapped"] == 1
    # swapped back to raw, the edge keeps its coded bits for the prior (the choice is stable)
    assert p.candidates()[prompt_node.id].bits == prompt_node.bits
    assert p.rebalance()["raw_added"] == []
    big = Store(db, llama, checkpoint_budget=s.checkpoint_size(24) + 4096)
    out = big.rebalance()
    assert out["kept"] == [prompt_node.id]  # the checkpoint replaces the raw tier there
    assert prompt_node.id not in out["raw"] and big.stats()["checkpoints"] == 1
    assert out["policy_bytes"] <= big.budget
    r = big.compact()  # the prompt edge was freed from the raw tier: coded again
    assert r.pending == 0
    restored = big.get_cache("hot2")
    assert big.last_restore["checkpoint_depth"] == len(PROMPT)
    assert restored.input_ids[0].tolist() == data["hot2"]
    _check(db, llama, data)


def test_the_stored_bytes_of_the_hot_tiers_stay_within_the_budget(db, llama):  # noqa: F811
    """The policy budgets with the checkpoint size the store then writes (quantized records
    are estimated exactly), so the real records and raw edges fit too."""
    s, data = _coded_store(db, llama)
    one = s.checkpoint_size(31)
    for policy in ("lru", "prior"):
        t = Store(db, llama, checkpoint_budget=one + 100, checkpoint_policy=policy,
                  checkpoint_quant=("turboquant-mse", 4))
        for name in ["hot0", "cold1", "hot0", "hot2", "cold0"]:
            assert t.get_ids(name) == data[name]
            out = t.rebalance(name)
            st = t.stats()
            assert st["checkpoint_bytes"] + st["raw_kept_bytes"] <= t.budget
            assert out["policy_bytes"] == st["checkpoint_bytes"] + st["raw_kept_bytes"]
        assert st["checkpoints"] == 1 and st["raw_kept_edges"] >= 1
    _check(db, llama, data)


def test_a_pending_edge_marked_raw_is_never_coded(db, llama):  # noqa: F811
    data = _data()
    s = Store(db, llama, chunk=CHUNK, checkpoint_budget=4 * 13, checkpoint_policy="lru")
    for k, v in data.items():
        s.put(k, v)
    s.get_ids("cold1")
    out = s.rebalance("cold1")
    leaf = s.trie.sessions["cold1"].id
    assert out["raw"] == [leaf] and out["raw_swapped"] == 0  # raw already: only marked
    r = s.compact()
    assert r.kept_raw == 1 and r.pending == 0 and s.stats()["raw_edges"] == 1
    _check(db, llama, data)


def test_compaction_leaves_an_edge_marked_raw_while_it_was_coding(db, llama, monkeypatch):  # noqa: F811, E501
    data = _data()
    s = Store(db, llama, chunk=CHUNK)
    for k, v in data.items():
        s.put(k, v)
    other = Store(db, llama, checkpoint_budget=4 * 13, checkpoint_policy="lru")
    assert other.has("cold2")
    leaf = other.trie.sessions["cold2"].id
    real, rounds = compaction_mod.encode_edges, []

    def racing(lm, chunk, jobs, *procedure):
        if not rounds:  # while the batch is coded, another process keeps an edge raw
            other.get_ids("cold2")
            assert other.rebalance("cold2")["raw"] == [leaf]
        rounds.append(len(jobs))
        return real(lm, chunk, jobs, *procedure)

    monkeypatch.setattr(compaction_mod, "encode_edges", racing)
    r = s.compact(batch=100)
    assert r.skipped == 1 and r.kept_raw == 1 and r.pending == 0
    fresh = _check(db, llama, data)
    assert fresh.tiers() == {leaf: "raw"} and fresh.stats()["raw_edges"] == 1


_RETIER = PAUSE_HOOK + """
import sys, pathlib
sys.path.insert(0, {tests!r})
from conftest import tiny_llama
from seqkv.store import Store
s = Store({db!r}, tiny_llama(), checkpoint_budget={budget})
pathlib.Path({started!r}).write_text("go")
print(s.rebalance())
"""


def _spawn(db_url, tmp_path, budget, env=None):
    started = tmp_path / f"started-{random.random()}"
    return spawn_script(_RETIER, env, db=db_url, budget=budget, started=str(started)), started


def test_kill_9_during_the_swap_to_raw_loses_nothing(db, llama, tmp_path):  # noqa: F811
    s, data = _coded_store(db, llama)
    coded = s.stats()
    budget = 4 * len(PROMPT)
    # killed while its swap transaction (the edge raw and its tier record) is about to commit
    marker = tmp_path / "paused"
    p, _ = _spawn(db, tmp_path, budget, {PAUSE_ENV: str(marker), "SEQKV_REDIS_LOCK_TTL": "2"})
    wait_for(p, marker, 90)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    fresh = _check(db, llama, data)
    assert fresh.tiers() == {} and fresh.stats()["bits_total"] == coded["bits_total"]
    # killed at a random moment: either state, each consistent
    p, started = _spawn(db, tmp_path, budget)
    wait_for(p, started, 90)
    time.sleep(random.uniform(0.0, 0.3))
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    fresh = _check(db, llama, data)
    st = fresh.stats()
    assert st["raw_edges"] == st["raw_kept_edges"] == len(fresh.tiers()) <= 1
    # the next run finishes it, and compaction keeps it raw
    out = Store(db, llama, checkpoint_budget=budget).rebalance()
    assert len(out["raw"]) == 1 and Store(db, llama).compact().kept_raw == 1
    assert _check(db, llama, data).stats()["raw_kept_bytes"] == budget


def test_a_cache_read_through_the_server_decodes_only_below_the_checkpoint(db, llama):  # noqa: F811, E501
    """The server's batched read for a KV cache starts below the session's deepest checkpoint
    (the restore starts there): the coded prompt edge above it is not decoded, the ids and
    the cache are exact; a plain read of the same session decodes it."""
    from seqkv.server import _get_many

    s, data = _coded_store(db, llama)
    prompt_node = s.trie.sessions["hot0"].parent
    big = Store(db, llama, checkpoint_budget=s.checkpoint_size(24) + 4096)
    assert big.rebalance()["kept"] == [prompt_node.id]
    big.compact()
    reader = Store(db, llama)
    assert _get_many(reader, [("hot2", True)]) == [(data["hot2"], None)]
    assert not reader.trie.nodes[prompt_node.id].known  # above the checkpoint: not decoded
    restored = reader.get_cache("hot2", count=False)
    assert restored.input_ids[0].tolist() == data["hot2"]
    assert reader.last_restore["checkpoint_depth"] == len(PROMPT)
    assert _get_many(reader, [("hot2", False)]) == [(data["hot2"], None)]
    assert reader.trie.nodes[prompt_node.id].known
