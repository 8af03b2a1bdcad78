"""Which tier each trie node's data lives in: one small :class:`Policy` interface, two policies.

Three tiers, fastest to restore first (arXiv 2604.15356 §5, the PLT's storage tiers):

- ``checkpoint``: the node keeps a KV checkpoint (the path's KV, per-vector quantized or raw,
  and its ids); a restore through the node starts there, nothing above it is decoded or
  prefilled.
- ``raw``: the node's edge keeps its token ids (4 bytes a token); a restore reads them without
  the model and only prefills them.
- ``coded`` (the default, and every node's tier without a budget): the edge is one rANS stream
  under the model (a few bits a token); a restore decodes it, one model step a token.

Like SGLang's eviction strategies, a policy only decides; the tier manager
(``checkpoints.py``) materializes and drops checkpoints, swaps edges to raw and lets
compaction code those that cooled. Both policies see the same accesses and the same byte budget
(arXiv 2604.06228, prior-guided caching), which bounds the bytes of the two hot tiers together:
each checkpoint's record and 4 bytes a token of each edge the policy keeps raw.

- :class:`LRUPolicy`: a restore admits its node as a checkpoint (if one fits the budget at
  all) and the edges of its path as raw; while over budget, the least recently used entry is
  demoted one tier (a checkpoint to raw, a raw edge to coded).
- :class:`PriorGuidedPolicy`: a tier's value is the node's expected reuse times the restore
  compute it saves, per byte. Expected reuse = observed hits + the prior's estimate, and the
  prior is the PLT's measure of the node: how many stored sessions pass through it (each is a
  future restore that would go through there) weighted by the model's own probability of the
  path, 2^(-bits/token) (a low-surprisal prefix, a template or system prompt, is likely to be
  sent again by sessions not yet seen). Greedy knapsack by value density under the budget; a
  raw edge saves its decode steps, a checkpoint the decode of the coded edges between it and
  the deepest checkpoint above it plus the prefill of that stretch (less loading it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from ..core.errors import SeqkvError

RAW_BYTES_PER_TOKEN = 4  # a raw edge stores its token ids as uint32


class Tier(StrEnum):
    """Where a node's data lives (absent from a policy's answer: ``CODED``)."""

    CHECKPOINT = "checkpoint"
    RAW = "raw"
    CODED = "coded"


@dataclass
class NodeInfo:
    """What a policy knows about a trie node (and the edge into it)."""

    id: str
    depth: int
    bytes: int  # checkpoint size (the estimate the budget counts)
    refs: int  # stored sessions through the node
    bits: float  # -log2 P_M(path) as coded
    hits: int = 0
    last: float = 0.0  # last access (Unix time; any increasing clock)
    ancestors: list[str] = field(default_factory=list)  # nodes above it, nearest last
    n: int = 0  # tokens of its edge (0: the raw tier is not offered)
    checkpointable: bool = True  # may hold a checkpoint (deep enough, a branch or session end)

    @property
    def raw_bytes(self) -> int:
        """Bytes of the edge kept raw (its token ids)."""
        return RAW_BYTES_PER_TOKEN * self.n


def tier_bytes(node: NodeInfo, tier: Tier) -> int:
    """The budgeted bytes of ``node`` in ``tier`` (coded edges are the store's floor: 0)."""
    if tier is Tier.CHECKPOINT:
        return node.bytes
    return node.raw_bytes if tier is Tier.RAW else 0


def tiers_bytes(nodes: dict[str, NodeInfo], tiers: dict[str, Tier]) -> int:
    """The budgeted bytes of a tier assignment."""
    return sum(tier_bytes(nodes[i], t) for i, t in tiers.items())


def restore_cost(
    depth: int, ckpt_depth: int, chunk: int, step_cost: float, prefill_cost: float
) -> float:
    """Restore compute (seconds, from measured unit costs) of a path of ``depth`` tokens when
    its deepest checkpoint is at ``ckpt_depth``: decode steps from the context window start,
    plus prefill of the suffix."""
    window = ckpt_depth - ckpt_depth % chunk if ckpt_depth else 0
    return (depth - window) * step_cost + (depth - ckpt_depth) * prefill_cost


class Policy(Protocol):
    """Each node's tier. Given every node, the tiers now (node id -> tier; absent: coded), the
    node a restore just ended at (or None) and the byte budget, return the new tiers (their
    bytes, :func:`tiers_bytes`, within the budget); the store materializes and drops."""

    name: str

    def tiers(self, nodes: dict[str, NodeInfo], current: dict[str, Tier],
              accessed: str | None, budget: int) -> dict[str, Tier]: ...


class _CheckpointsOnly:
    """``select``: the two-tier view of a policy (checkpoints; every edge coded), for callers
    of the checkpoint-only API (benchmarks/store_workloads.py); a custom policy that has only
    ``select`` drives the store through :class:`SelectAdapter`."""

    def select(self, nodes: dict[str, NodeInfo], kept: set[str], accessed: str | None,
               budget: int) -> set[str]:
        """The nodes to keep a checkpoint at, no edge raw."""
        two = {i: dataclasses.replace(n, n=0) for i, n in nodes.items()}
        current = {i: Tier.CHECKPOINT for i in kept if i in two}
        out = self.tiers(two, current, accessed, budget)  # type: ignore[attr-defined]
        return {i for i, t in out.items() if t is Tier.CHECKPOINT}


@dataclass
class LRUPolicy(_CheckpointsOnly):
    """A restore admits its node as a checkpoint and its path's edges as raw; while over budget
    the least recently used entry is demoted one tier (checkpoint -> raw -> coded)."""

    name: str = "lru"

    def tiers(self, nodes: dict[str, NodeInfo], current: dict[str, Tier],
              accessed: str | None, budget: int) -> dict[str, Tier]:
        out = {i: t for i, t in current.items() if i in nodes and t is not Tier.CODED}
        if accessed in nodes:
            a = nodes[accessed]
            for i in [*a.ancestors, accessed]:
                if i in nodes and i not in out and nodes[i].n > 0:
                    out[i] = Tier.RAW
            if a.checkpointable and a.bytes <= budget:  # one larger than the budget is not
                out[accessed] = Tier.CHECKPOINT  # admitted (it would evict everything else)
        used = tiers_bytes(nodes, out)
        while used > budget:
            # least recent first; of one restore's entries the checkpoint (the largest) first
            i = min(out, key=lambda i: (nodes[i].last, out[i] is not Tier.CHECKPOINT, i))
            n, t = nodes[i], out.pop(i)
            used -= tier_bytes(n, t)
            if t is Tier.CHECKPOINT and 0 < n.raw_bytes < n.bytes:
                out[i] = Tier.RAW
                used += n.raw_bytes
        return out


@dataclass
class PriorGuidedPolicy(_CheckpointsOnly):
    """Expected reuse (hits + prior_weight * refs * (1 + 2^-bits/token)) x restore compute
    saved / bytes, greedily. The unit costs (per token: a decode step, a prefill, loading a
    checkpoint) only need to be right relative to each other; the defaults are the 2-core
    CPU's order of magnitude (BENCHMARKS.md), a deployment passes what it measures."""

    prior_weight: float = 1.0
    decode_cost: float = 1.0
    prefill_cost: float = 0.05
    load_cost: float = 0.02
    name: str = "prior"

    def expected_reuse(self, n: NodeInfo) -> float:
        per_token = n.bits / max(n.depth, 1)
        return n.hits + self.prior_weight * n.refs * (1.0 + 2.0 ** (-per_token))

    def _checkpoint_saving(self, n: NodeInfo, nodes: dict[str, NodeInfo],
                           out: dict[str, Tier]) -> float:
        """Compute one restore through ``n`` saves by a checkpoint there, given ``out``: the
        stretch below its deepest checkpointed ancestor is neither decoded (where coded) nor
        prefilled, but loaded."""
        above = [nodes[a] for a in n.ancestors if a in nodes]
        base = max((a.depth for a in above if out.get(a.id) is Tier.CHECKPOINT), default=0)
        raw = sum(a.n for a in above if a.depth > base and out.get(a.id) is Tier.RAW)
        raw += n.n if out.get(n.id) is Tier.RAW else 0
        stretch = n.depth - base
        return (self.decode_cost * (stretch - raw)
                + (self.prefill_cost - self.load_cost) * stretch)

    def tiers(self, nodes: dict[str, NodeInfo], current: dict[str, Tier],
              accessed: str | None, budget: int) -> dict[str, Tier]:
        out: dict[str, Tier] = {}
        used = 0
        reuse = {i: self.expected_reuse(n) for i, n in nodes.items()}
        while True:
            best: tuple[str, Tier] | None = None
            best_score = 0.0
            for i, n in nodes.items():
                t = out.get(i)
                if t is None and n.n > 0 and n.raw_bytes <= budget - used:
                    # a raw edge saves its decode steps (the prefill is needed either way)
                    score = reuse[i] * self.decode_cost * n.n / n.raw_bytes
                    if score > best_score:
                        best, best_score = (i, Tier.RAW), score
                if t is not Tier.CHECKPOINT and n.checkpointable:
                    extra = n.bytes - (n.raw_bytes if t is Tier.RAW else 0)
                    if extra <= budget - used:
                        saving = reuse[i] * self._checkpoint_saving(n, nodes, out)
                        score = saving / max(extra, 1)
                        if score > best_score:
                            best, best_score = (i, Tier.CHECKPOINT), score
            if best is None:
                return out
            i, t = best
            used += tier_bytes(nodes[i], t) - tier_bytes(nodes[i], out.get(i, Tier.CODED))
            out[i] = t


POLICIES: dict[str, type] = {"lru": LRUPolicy, "prior": PriorGuidedPolicy,
                             "prior-guided": PriorGuidedPolicy}


def policy_by_name(name: str) -> Policy:
    """A built-in policy by name (``lru``, ``prior``), with its default parameters."""
    if name not in POLICIES:
        raise SeqkvError(f"unknown checkpoint policy {name!r} (lru, prior)")
    return POLICIES[name]()


class SelectAdapter:
    """A policy written against the checkpoint-only interface (``select`` returning the nodes
    to checkpoint) as a tier policy: its nodes checkpointed, every edge coded."""

    def __init__(self, policy) -> None:
        self.policy, self.name = policy, getattr(policy, "name", type(policy).__name__)

    def tiers(self, nodes: dict[str, NodeInfo], current: dict[str, Tier],
              accessed: str | None, budget: int) -> dict[str, Tier]:
        kept = {i for i, t in current.items() if t is Tier.CHECKPOINT}
        return {i: Tier.CHECKPOINT for i in self.policy.select(nodes, kept, accessed, budget)}


def as_tier_policy(policy) -> Policy:
    """``policy`` if it decides tiers, else its checkpoint-only ``select`` adapted."""
    return policy if hasattr(policy, "tiers") else SelectAdapter(policy)
