"""The radix trie alone (no model): insert / match / split / remove invariants, dedup, bits."""

import constriction
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from seqkv.core.distribution import reduced_weights
from seqkv.store.coding import encode_intervals
from seqkv.store.trie import Trie

TOTAL = 1 << 24


def intervals_of(tokens):
    """Deterministic fake intervals that depend on the token and its position only."""
    return np.array([[(t * 7919 + i * 104729) % (TOTAL // 2) + 1, 1 + (t * 31 + i) % 4000 + 64]
                     for i, t in enumerate(tokens)], dtype=np.int64)


def insert(trie, name, ids):
    """The store's insertion, without a model: match, split mid-edge, add the rest."""
    m = trie.match(ids)
    node = m.node
    if m.offset < node.n:
        node = trie.split(node, m.offset)
    if m.depth < len(ids):
        iv = intervals_of(ids)[m.depth:]
        node = trie.add_child(node, ids[m.depth:], iv)
    trie.add_session(name, node)
    return m.depth


def path_tokens(trie, node):
    return [t for n in trie.path(node) for t in n.tokens]


def check_invariants(trie, sessions):
    for name, ids in sessions.items():
        assert path_tokens(trie, trie.sessions[name]) == ids
        m = trie.match(ids)
        assert m.depth == len(ids)
    for n in trie.edges():
        assert n.n >= 1 and n.first == n.tokens[0] and n.parent.children[n.first] is n
        assert n.start == n.parent.depth
        # per-token intervals are a function of the path: a split never changes them
        assert np.array_equal(n.intervals, intervals_of(path_tokens(trie, n))[n.start:])
        assert n.sessions or n.children  # nothing dangling
    assert trie.bits_total == sum(n.bits for n in trie.edges())
    # unique tokens = distinct prefixes of all sessions
    prefixes = {tuple(ids[: i + 1]) for ids in sessions.values() for i in range(len(ids))}
    assert trie.tokens_unique == len(prefixes)


seqs = st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=12), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(seqs, st.data())
def test_insert_match_delete_invariants(raw, data):
    trie = Trie(encode_intervals)
    sessions = {}
    for i, ids in enumerate(raw):
        sessions[f"s{i}"] = ids
        insert(trie, f"s{i}", ids)
        check_invariants(trie, sessions)
    for name in data.draw(st.permutations(sorted(sessions))):
        trie.remove_session(name)
        del sessions[name]
        check_invariants(trie, sessions)
    assert list(trie.edges()) == []


def test_shared_prefix_stored_once():
    trie = Trie(encode_intervals)
    prompt = list(range(2000))
    insert(trie, "a", prompt + [1, 2, 3])
    one = trie.bits_total
    for i in range(20):
        insert(trie, f"b{i}", prompt + [7, i])
    assert trie.tokens_unique == 2000 + 3 + 1 + 20  # the 7 after the prompt is shared too
    prompt_bits = trie.match(prompt).node.bits
    # 21 sessions, the 2,000-token prompt paid once: the total is far below 21x one session
    assert trie.bits_total < one + 20 * (one - prompt_bits) + 20 * 200
    assert trie.bits_total < 2 * one


def decode_edge(node):
    """An edge's rANS words decoded under the distributions it was coded with (the token is
    symbol 1 of [below, token, above] at each position): what was coded, and whether the
    stream was used up exactly."""
    iv = np.asarray(node.intervals).reshape(-1, 2)
    coder = constriction.stream.stack.AnsCoder(np.asarray(node.words, dtype=np.uint32))
    coded = coder.decode(constriction.stream.model.Categorical(perfect=False),
                         reduced_weights(iv[:, 0], iv[:, 1]))
    return coded.tolist(), coder.is_empty()


def test_split_keeps_edges_decodable_as_a_cut():
    trie = Trie(encode_intervals)
    insert(trie, "a", [1, 2, 3, 4, 5])
    whole = trie.sessions["a"]
    assert decode_edge(whole) == ([1] * 5, True)
    insert(trie, "b", [1, 2, 9])  # cuts a's edge after [1, 2]
    mid = trie.match([1, 2]).node
    assert mid.tokens == [1, 2] and sorted(mid.children) == [3, 9]
    assert trie.sessions["a"] is whole and whole.tokens == [3, 4, 5]
    # each piece is a stream of its own, coded under its own positions' distributions: it
    # decodes on its own, to exactly its tokens, and nothing of the other piece is left in it
    for node, ids in ((mid, [1, 2, 3, 4, 5]), (whole, [1, 2, 3, 4, 5]),
                      (trie.sessions["b"], [1, 2, 9])):
        assert not node.raw
        assert np.array_equal(node.intervals, intervals_of(ids)[node.start:node.start + node.n])
        assert decode_edge(node) == ([1] * node.n, True)
