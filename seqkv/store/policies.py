"""Which trie nodes deserve a KV checkpoint: one small :class:`Policy` interface, two policies.

Like SGLang's eviction strategies, a policy only ranks; the checkpoint manager
(``checkpoints.py``) materializes and drops. Both policies see the same accesses and the same
byte budget (arXiv 2604.06228, prior-guided caching):

- :class:`LRUPolicy`: the node a restore ended at is admitted; least recently used goes first.
- :class:`PriorGuidedPolicy`: a node's value is its expected reuse times the restore compute
  it saves per byte. Expected reuse = observed hits + the prior's estimate, and the prior is
  the PLT's measure of the node: how many stored sessions pass through it (each is a future
  restore that would start there) weighted by the model's own probability of the path,
  2^(-bits/token) (a low-surprisal prefix, a template or system prompt, is likely to be sent
  again by sessions not yet seen). Greedy knapsack by value density under the budget; the
  saving of a node counts only the compute beyond its deepest kept ancestor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..core.errors import SeqkvError


@dataclass
class NodeInfo:
    """What a policy knows about a candidate node."""

    id: str
    depth: int
    bytes: int  # checkpoint size
    refs: int  # stored sessions through the node
    bits: float  # -log2 P_M(path) as coded
    hits: int = 0
    last: float = 0.0  # last access (logical clock)
    ancestors: list[str] = field(default_factory=list)  # candidate ids above it, nearest last


def restore_cost(
    depth: int, ckpt_depth: int, chunk: int, step_cost: float, prefill_cost: float
) -> float:
    """Restore compute (seconds, from measured unit costs) of a path of ``depth`` tokens when
    its deepest checkpoint is at ``ckpt_depth``: decode steps from the context window start,
    plus prefill of the suffix."""
    window = ckpt_depth - ckpt_depth % chunk if ckpt_depth else 0
    return (depth - window) * step_cost + (depth - ckpt_depth) * prefill_cost


class Policy(Protocol):
    """Which nodes keep a KV checkpoint. Given every candidate node, the ones holding one now,
    the node a restore just ended at (or None) and the byte budget, return the set to keep
    (its bytes within the budget); the store materializes the new ones and drops the rest."""

    name: str

    def select(self, nodes: dict[str, NodeInfo], kept: set[str], accessed: str | None,
               budget: int) -> set[str]: ...


@dataclass
class LRUPolicy:
    """The node a restore ended at is admitted; least recently used goes first."""

    name: str = "lru"

    def select(self, nodes: dict[str, NodeInfo], kept: set[str], accessed: str | None,
               budget: int) -> set[str]:
        keep = set(kept) | ({accessed} if accessed else set())
        order = sorted(keep, key=lambda i: nodes[i].last)
        used = sum(nodes[i].bytes for i in keep)
        for i in order:
            if used <= budget:
                break
            keep.discard(i)
            used -= nodes[i].bytes
        return keep


@dataclass
class PriorGuidedPolicy:
    """Expected reuse (hits + prior_weight * refs * 2^-bits/token) x saving / bytes."""

    prior_weight: float = 1.0
    name: str = "prior"

    def expected_reuse(self, n: NodeInfo) -> float:
        per_token = n.bits / max(n.depth, 1)
        return n.hits + self.prior_weight * n.refs * (1.0 + 2.0 ** (-per_token))

    def select(self, nodes: dict[str, NodeInfo], kept: set[str], accessed: str | None,
               budget: int) -> set[str]:
        keep: set[str] = set()
        used = 0
        remaining = dict(nodes)
        while remaining:
            best, best_score = None, 0.0
            for i, n in remaining.items():
                if n.bytes > budget - used:
                    continue
                base = max((nodes[a].depth for a in n.ancestors if a in keep), default=0)
                score = self.expected_reuse(n) * (n.depth - base) / max(n.bytes, 1)
                if score > best_score:
                    best, best_score = i, score
            if best is None:
                break
            keep.add(best)
            used += nodes[best].bytes
            del remaining[best]
        return keep


POLICIES: dict[str, type] = {"lru": LRUPolicy, "prior": PriorGuidedPolicy,
                             "prior-guided": PriorGuidedPolicy}


def policy_by_name(name: str) -> Policy:
    if name not in POLICIES:
        raise SeqkvError(f"unknown checkpoint policy {name!r} (lru, prior)")
    return POLICIES[name]()
