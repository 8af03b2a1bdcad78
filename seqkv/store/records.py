"""The store's records: what each kind holds and how it is packed.

Every record is one checksummed ``seqkv.blob`` container (blake2b over header and sections), so
a flipped bit anywhere is refused on read as :class:`StoreCorruptError`.

    meta      (store-wide)  model fingerprint and numerics profile the store was created under
    edge      one trie edge: parent id, start, length, first token, token hash, and either
              the token ids (``raw``: written by ``put``, pending compaction; the token hash is
              checked on read) or one rANS stream of them (coded)
    session   the node a session ends at, its length and token hash, its text recipe
    ckptmeta  / ckpt    a KV checkpoint's size (read with the trie) / its payload (read on restore)
    tier      an edge the tier policy keeps raw (compaction leaves it; ``policies.py``), with
              its coded bits from before it was swapped back to raw (the prior needs them)
    hits      a session's restores, every process's (count, last one's Unix time): added to
              and read back at each rebalance; a node's are its sessions' summed
    exact     a session's exact-tier residual blob
"""

from __future__ import annotations

import numpy as np

from ..core.blob import pack, unpack
from ..core.errors import BlobError
from .coding import encode_intervals
from .trie import Node, Trie, edge_hash

KINDS = ("edge", "session", "ckptmeta", "tier")  # what a namespace's trie is loaded from


class StoreCorruptError(BlobError):
    """A record failed its checksum or does not fit the trie."""


def parse(kind: str, key: str, data: bytes) -> tuple[dict, list[bytes]]:
    """Header and sections of a record of ``kind``, or StoreCorruptError."""
    try:
        header, sections = unpack(data)
    except BlobError as e:
        raise StoreCorruptError(f"corrupt store record {kind} {key}: {e}") from e
    if header.get("kind") != kind:
        raise StoreCorruptError(f"corrupt store record {kind} {key}: kind {header.get('kind')!r}")
    return header, sections


def pack_edge(node: Node) -> bytes:
    """A raw edge holds its token ids (4 bytes each), a coded one its rANS words."""
    header = {"kind": "edge", "p": node.parent.id, "s": node.start, "n": node.n,
              "f": node.first, "h": node.token_hash}
    if node.raw:
        header["raw"] = True
        return pack(header, [np.asarray(node.tokens, "<u4").tobytes()])
    return pack(header, [node.words.astype("<u4").tobytes()])


def parse_edge(key: str, data: bytes) -> tuple[dict, Node]:
    """An edge record as a detached node (parent unset) and its header."""
    h, sections = parse("edge", key, data)
    try:
        start, n, first, th = int(h["s"]), int(h["n"]), int(h["f"]), str(h["h"])
        words = np.frombuffer(sections[0], dtype="<u4").astype(np.uint32)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise StoreCorruptError(f"corrupt store record edge {key}: {e}") from e
    if h.get("raw"):
        tokens = words.astype(np.int64).tolist()
        if len(tokens) != n or edge_hash(tokens) != th or tokens[0] != first:
            raise StoreCorruptError(f"corrupt store record edge {key}: tokens do not match "
                                    "their hash")
        node = Node(key, None, start, n, first, np.zeros(0, np.uint32), tokens, None, th,
                    raw=True)
    else:
        node = Node(key, None, start, n, first, words, token_hash=th)
    return h, node


def same_edge(a: dict, b: dict) -> bool:
    """Two edge headers describe the same edge content at the same place (compare-and-swap)."""
    return all(a.get(k) == b.get(k) for k in ("p", "s", "n", "f", "h", "raw"))


def pack_session(header: dict) -> bytes:
    return pack({**header, "kind": "session"}, [])


def load_trie(records: dict[str, dict[str, bytes]],
              known: dict[str, Node]) -> tuple[Trie, dict[str, dict]]:
    """A namespace's trie and session headers from its ``edge`` and ``session`` records.
    Tokens and intervals this process already has for an unchanged edge (same id, start,
    length and token hash in ``known``) are kept, so nothing is decoded twice."""
    trie, info = Trie(encode_intervals), {}
    apply_changes(trie, info, records, known)
    return trie, info


def apply_changes(trie: Trie, info: dict[str, dict], changes: dict[str, dict[str, bytes | None]],
                  known: dict[str, Node] | None = None) -> None:
    """Bring ``trie`` and the session headers ``info`` up to date with changed records (a
    value None: the record was deleted), in place: what a reader does with the backend's
    change log instead of re-reading the namespace. Nodes keep their identity; an edge whose
    position and tokens did not change keeps what this process decoded of it."""
    sessions = changes.get("session", {})
    for name in sessions:  # sessions changed or deleted leave their nodes
        node = trie.sessions.pop(name, None)
        if node is not None:
            node.sessions.discard(name)
        info.pop(name, None)
    updated = _update_edges(trie, changes.get("edge", {}),
                            trie.nodes if known is None else known)
    for start, parent_id, node in sorted(updated, key=lambda r: r[0]):
        parent = trie.nodes.get(parent_id)
        if parent is None or parent.depth != start or node.first in parent.children:
            raise StoreCorruptError(f"corrupt store: edge {node.id} does not fit the trie")
        node.parent = parent
        parent.children[node.first] = node
    for name, data in sessions.items():
        if data is None:
            continue
        h, _ = parse("session", name, data)
        node = trie.nodes.get(h.get("node"))
        if node is None or node.depth != int(h.get("n", -1)):
            raise StoreCorruptError(f"corrupt store: session {name!r} has no path")
        trie.add_session(name, node)
        info[name] = h


_EDGE_FIELDS = ("start", "n", "first", "words", "tokens", "intervals", "token_hash", "raw")


def _update_edges(trie: Trie, edges: dict[str, bytes | None],
                  known: dict[str, Node]) -> list[tuple[int, str, Node]]:
    """Detach every changed edge, drop the deleted ones, update (or create) the others in
    place; returns (start, parent id, node) of those to attach again."""
    updated = []
    for key, data in edges.items():
        node = trie.nodes.get(key)
        if node is not None and node.parent is not None and \
                node.parent.children.get(node.first) is node:
            del node.parent.children[node.first]
        if data is None:
            trie.nodes.pop(key, None)
            continue
        h, new = parse_edge(key, data)
        prev = known.get(key)
        if (prev is not None and prev.known and prev.start == new.start and prev.n == new.n
                and prev.token_hash == new.token_hash):
            new.tokens, new.intervals = prev.tokens, prev.intervals  # decoded before
        if node is None:
            node = trie.nodes[key] = new
        else:  # the same object: its children and sessions keep pointing at it
            for f in _EDGE_FIELDS:
                setattr(node, f, getattr(new, f))
        updated.append((node.start, h["p"], node))
    return updated
