"""A radix trie over token sequences: the Probabilistic Language Trie's shape (no I/O, no model).

Like SGLang's radix cache: one node per edge, children keyed by the edge's first token,
plain ``match`` / ``insert`` / ``split`` / ``remove_session``. What makes it probabilistic lives
on the edges: each carries its tokens' fixed-point intervals (start, freq) under the model,
given the edge's full prefix from the root, and the range-coded words of those tokens.

An edge is *raw* (its token ids as written by ``put``, pending compaction) or *coded* (a rANS
stream). A coded edge's tokens may be *unknown* in memory (only its first token, length, token
hash and words were loaded from a backend): ``match`` then checks the query's span against the
edge's token hash, and passes through it when the whole edge matches (no model needed); only
when the query ends or diverges inside such an edge does it stop there and report it as
``blocked``, and the caller decodes it (that needs the model) and calls ``match`` again.

Intervals are per token and depend only on the token's path, so splitting a coded edge whose
intervals are known is a cut of its token and interval arrays, both halves re-coded
(``encode``), cheaply, without the model; any other split leaves two raw halves for the next
compaction. ``bits_total`` is the sum, over coded edges, of their coded bits.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..core.distribution import PRECISION

# intervals [n, 2] int64 (start, freq) -> coded words (uint32)
Encoder = Callable[[np.ndarray], np.ndarray]


def info_bits(intervals: np.ndarray) -> np.ndarray:
    """-log2 of each token's fixed-point probability, from its (start, freq) rows."""
    freq = np.asarray(intervals).reshape(-1, 2)[:, 1].astype(np.float64)
    return PRECISION - np.log2(freq)


def new_id() -> str:
    """Random 64-bit node ids: unique across processes without coordination."""
    return secrets.token_hex(8)


@dataclass(eq=False)
class Node:
    """The edge from ``parent`` into this node, and the node itself."""

    id: str
    parent: Node | None
    start: int  # absolute position of the edge's first token on its path
    n: int  # edge length in tokens
    first: int  # the edge's first token (-1 for the root)
    words: np.ndarray  # range-coded tokens (uint32); empty while raw
    tokens: list[int] | None = None  # None: not decoded in this process
    intervals: np.ndarray | None = None  # [n, 2] int64, in memory only
    token_hash: str = ""
    children: dict[int, Node] = field(default_factory=dict)
    sessions: set[str] = field(default_factory=set)
    raw: bool = False  # stored as token ids, pending compaction (tokens always known)

    @property
    def depth(self) -> int:
        return self.start + self.n

    @property
    def bits(self) -> int:
        """Coded bits of the edge (0 while raw: it is not coded yet)."""
        return 0 if self.raw else 32 * int(self.words.size)

    @property
    def known(self) -> bool:
        return self.tokens is not None

    def info_bits(self, upto: int | None = None) -> float:
        """-log2 P_M of the edge's first ``upto`` tokens, from the fixed-point intervals."""
        return float(np.sum(info_bits(self.intervals[: self.n if upto is None else upto])))


@dataclass
class Match:
    """Where a sequence leaves the trie: inside ``node``'s edge after ``offset`` of its tokens."""

    node: Node
    offset: int  # tokens of node's edge matched (== node.n: the whole edge)
    depth: int  # tokens of the sequence matched
    blocked: Node | None = None  # an edge whose tokens must be decoded before matching on


class Trie:
    def __init__(self, encode: Encoder) -> None:
        self.encode = encode
        self.root = Node("root", None, 0, 0, -1, np.zeros(0, np.uint32), [],
                         np.zeros((0, 2), np.int64))
        self.nodes: dict[str, Node] = {"root": self.root}
        self.sessions: dict[str, Node] = {}

    # -- queries -------------------------------------------------------------------------
    def match(self, ids: list[int]) -> Match:
        node, depth = self.root, 0
        while depth < len(ids):
            child = node.children.get(ids[depth])
            if child is None:
                break
            if not child.known:
                span = ids[depth : depth + child.n]
                if len(span) == child.n and edge_hash(span) == child.token_hash:
                    child.tokens = list(span)  # the whole edge matches: its tokens are these
                else:
                    return Match(node, node.n, depth, blocked=child)
            k = 0
            while k < child.n and depth + k < len(ids) and child.tokens[k] == ids[depth + k]:
                k += 1
            depth += k
            if k < child.n:
                return Match(child, k, depth)
            node = child
        return Match(node, node.n, depth)

    def path(self, node: Node) -> list[Node]:
        """Root's children down to ``node`` (the root itself excluded)."""
        out = []
        while node is not None and node is not self.root:
            out.append(node)
            node = node.parent
        return out[::-1]

    def subtree(self, node: Node) -> Iterator[Node]:
        stack = [node]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def refs(self, node: Node) -> int:
        """Sessions whose path passes through (or ends at) ``node``."""
        return sum(len(n.sessions) for n in self.subtree(node))

    def edges(self) -> Iterator[Node]:
        return (n for n in self.nodes.values() if n is not self.root)

    @property
    def bits_total(self) -> int:
        return sum(n.bits for n in self.edges())

    @property
    def tokens_unique(self) -> int:
        return sum(n.n for n in self.edges())

    def pending(self) -> list[Node]:
        """Raw edges (not coded yet), shallowest first."""
        return sorted((n for n in self.edges() if n.raw), key=lambda n: (n.start, n.id))

    # -- updates (each returns the nodes whose records changed) ---------------------------
    def split(self, node: Node, k: int) -> Node:
        """Cut ``node``'s edge after k tokens; returns the new middle node (node keeps its id,
        its children, sessions and depth, so its checkpoints stay valid). A coded edge whose
        intervals are known has both halves re-coded (no model); otherwise both halves are raw."""
        assert node.known and 0 < k < node.n
        recode = not node.raw and node.intervals is not None
        iv = node.intervals
        parent = node.parent
        empty = np.zeros(0, np.uint32)
        mid = Node(new_id(), parent, node.start, k, node.first,
                   self.encode(iv[:k]) if recode else empty, node.tokens[:k],
                   iv[:k].copy() if iv is not None else None, raw=not recode)
        mid.token_hash = edge_hash(mid.tokens)
        parent.children[mid.first] = mid
        node.tokens = node.tokens[k:]
        node.intervals = iv[k:].copy() if iv is not None else None
        node.parent, node.start, node.n = mid, node.start + k, node.n - k
        node.first = node.tokens[0]
        node.words = self.encode(node.intervals) if recode else empty
        node.raw = not recode
        node.token_hash = edge_hash(node.tokens)
        mid.children[node.first] = node
        self.nodes[mid.id] = mid
        return mid

    def add_child(self, parent: Node, tokens: list[int],
                  intervals: np.ndarray | None = None) -> Node:
        """A new edge below ``parent``: coded from ``intervals``, or raw without them."""
        assert tokens and tokens[0] not in parent.children
        if intervals is None:
            child = Node(new_id(), parent, parent.depth, len(tokens), tokens[0],
                         np.zeros(0, np.uint32), list(tokens), None, raw=True)
        else:
            child = Node(new_id(), parent, parent.depth, len(tokens), tokens[0],
                         self.encode(intervals), list(tokens), np.asarray(intervals, np.int64))
        child.token_hash = edge_hash(child.tokens)
        parent.children[child.first] = child
        self.nodes[child.id] = child
        return child

    def attach(self, node: Node) -> None:
        """Add a node loaded from a backend (its parent already attached)."""
        node.parent.children[node.first] = node
        self.nodes[node.id] = node

    def add_session(self, name: str, node: Node) -> None:
        node.sessions.add(name)
        self.sessions[name] = node

    def remove_session(self, name: str) -> list[Node]:
        """Forget a session; returns the edges no other session needs (now removed)."""
        node = self.sessions.pop(name)
        node.sessions.discard(name)
        removed = []
        while node is not self.root and not node.sessions and not node.children:
            del node.parent.children[node.first]
            del self.nodes[node.id]
            removed.append(node)
            node = node.parent
        return removed


def edge_hash(tokens: list[int]) -> str:
    return hashlib.blake2b(np.asarray(tokens, "<i8").tobytes(), digest_size=8).hexdigest()
