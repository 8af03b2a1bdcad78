"""Checkpoint policies behind one small interface: LRU, prior-guided, and a custom one."""

import pytest

from seqkv.core.errors import SeqkvError
from seqkv.store import Store
from seqkv.store.policies import LRUPolicy, NodeInfo, PriorGuidedPolicy, policy_by_name

from .test_store_backends import CHUNK


def nodes():
    return {
        "a": NodeInfo("a", 32, 100, refs=1, bits=32 * 8.0, last=1.0),
        "b": NodeInfo("b", 32, 100, refs=5, bits=32 * 1.0, last=2.0),
        "c": NodeInfo("c", 64, 100, refs=1, bits=64 * 8.0, last=3.0, ancestors=["b"]),
    }


def test_lru_keeps_the_most_recent_within_budget():
    assert LRUPolicy().select(nodes(), {"a", "b"}, "c", 200) == {"b", "c"}
    assert LRUPolicy().select(nodes(), set(), "a", 50) == set()  # larger than the budget


def test_prior_prefers_paths_many_sessions_share():
    keep = PriorGuidedPolicy().select(nodes(), set(), None, 100)
    assert keep == {"b"}  # 5 sessions through a likely prefix beat a deeper lone node
    assert PriorGuidedPolicy().select(nodes(), set(), None, 300) == {"a", "b", "c"}


def test_policy_names():
    assert policy_by_name("lru").name == "lru" and policy_by_name("prior").name == "prior"
    with pytest.raises(SeqkvError, match="unknown checkpoint policy"):
        policy_by_name("fifo")


class KeepDeepest:
    """A custom policy: the deepest candidate that fits, nothing else."""

    name = "deepest"

    def select(self, nodes, kept, accessed, budget):
        fits = [n for n in nodes.values() if n.bytes <= budget]
        return {max(fits, key=lambda n: n.depth).id} if fits else set()


def test_a_custom_policy_drives_the_store(tmp_path, llama):
    s = Store(str(tmp_path / "s.db"), llama, chunk=CHUNK, checkpoint_budget=10**9,
              checkpoint_policy=KeepDeepest())
    s.put("short", list(range(3, 23)))
    s.put("long", list(range(3, 23)) + list(range(40, 70)))
    out = s.rebalance()
    assert out["kept"] == [s.trie.sessions["long"].id] and s.stats()["checkpoints"] == 1
    assert s.get_ids("long") == list(range(3, 23)) + list(range(40, 70))


def _shared_prompt_store(tmp_path, llama, policy):
    """Four sessions behind one 40-token prompt, and one lone 50-token session; a budget that
    holds one checkpoint at the deepest node, not two."""
    prompt = [3 + (7 * i) % 300 for i in range(40)]
    db = str(tmp_path / f"{policy}.db")
    s = Store(db, llama, chunk=CHUNK)
    for i in range(4):
        s.put(f"user{i}", prompt + [10 + i] + list(range(100 + 10 * i, 109 + 10 * i)))
    s.put("lone", list(range(250, 300)))
    budget = s.checkpoint_size(50) + 2048  # one checkpoint (and its record header)
    assert 2 * s.checkpoint_size(40) > budget
    return Store(db, llama, checkpoint_budget=budget, checkpoint_policy=policy), prompt


def _kept_sessions(s):
    """What the kept checkpoints cover: session names at that node, or 'prompt'."""
    out = set()
    for node_id in s.ckpts:
        node = s.trie.nodes[node_id]
        out |= node.sessions or {"prompt"}
    return out


def test_prior_guided_keeps_the_shared_prompt_until_hits_say_otherwise(tmp_path, llama):
    s, _ = _shared_prompt_store(tmp_path, llama, "prior")
    out = s.rebalance()  # no restore yet: the prior alone decides
    assert _kept_sessions(s) == {"prompt"} and len(out["kept"]) == 1
    assert s.stats()["checkpoint_bytes"] <= s.budget
    for _ in range(3):  # a few restores of the lone session do not outweigh 4 sessions
        s.get_ids("lone")
        s.rebalance("lone")
    assert _kept_sessions(s) == {"prompt"}
    for _ in range(12):  # many do: observed reuse overtakes the prior
        s.get_ids("lone")
        s.rebalance("lone")
    assert _kept_sessions(s) == {"lone"}
    restored = s.get_cache("lone")  # and the restore starts from it
    assert s.last_restore["checkpoint_depth"] == 50
    assert restored.input_ids[0].tolist() == list(range(250, 300))


def test_lru_keeps_the_last_restored_session_regardless_of_sharing(tmp_path, llama):
    s, _ = _shared_prompt_store(tmp_path, llama, "lru")
    assert s.rebalance()["kept"] == []  # LRU admits only what a restore touched
    s.get_ids("user0")
    s.rebalance("user0")
    assert _kept_sessions(s) == {"user0"}
    s.get_ids("lone")
    s.rebalance("lone")
    assert _kept_sessions(s) == {"lone"} and s.stats()["checkpoint_bytes"] <= s.budget
