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
