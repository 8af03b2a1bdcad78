"""The store's per-path context is run_lockstep's canonical procedure, bit for bit."""

import random

import numpy as np
import torch

from seqkv.core.distribution import symbol_intervals
from seqkv.core.stepper import run_lockstep
from seqkv.store.coding import Cursor, encode_intervals


def test_cursor_matches_run_lockstep_and_resets_at_fixed_positions(llama):
    rng = random.Random(3)
    ids = [rng.randrange(3, 320) for _ in range(50)]
    chunk = 20
    expected = []
    for w in range(0, len(ids), chunk):
        part = ids[w : w + chunk]
        t = torch.tensor(part)

        def on_step(step, pmf, logits, t=t):
            s, f = symbol_intervals(pmf, t[step : step + 1])
            expected.append((int(s), int(f)))
            return t[step : step + 1]

        run_lockstep(llama, 1, len(part), on_step)
    cursor = Cursor(llama, chunk)
    got = cursor.encode(ids)
    assert got.tolist() == [list(e) for e in expected]
    # a cursor that jumps to position 33 (lazily, no tokens run before the window at 20)
    late = Cursor(llama, chunk)
    late.seek(ids[:33])
    assert late.encode(ids[33:]).tolist() == got[33:].tolist()
    assert late.steps == (33 - 20 + 1) + (40 - 34) + (50 - 40 + 1) - 1
    # decode the coded edge back from the same context
    dec = Cursor(llama, chunk)
    dec.seek(ids[:33])
    tokens, rows = dec.decode(encode_intervals(got[33:]), len(ids) - 33)
    assert tokens == ids[33:] and np.array_equal(rows, got[33:])


def test_encode_edges_reuses_a_shared_prefix_exactly(llama, gemma3):
    """Sibling edges below one prefix: the cursor crops back to the prefix instead of
    re-running it, and the rows are those a fresh cursor computes for each edge alone."""
    from seqkv.store.coding import decode_edges, encode_edges

    rng = random.Random(5)
    prefix = [rng.randrange(3, 290) for _ in range(30)]
    jobs = [(prefix + [7] * i, [rng.randrange(3, 290) for _ in range(6)]) for i in range(4)]
    jobs += [(prefix[:12], [5, 6, 7]), (prefix + [9], [8, 8])]
    for lm in (llama, gemma3):  # gemma3's sliding-window layers cannot crop: it re-runs
        rows = encode_edges(lm, 24, jobs)
        for (path, tokens), r in zip(jobs, rows, strict=True):
            fresh = Cursor(lm, 24)
            fresh.seek(path)
            assert np.array_equal(r, fresh.encode(tokens))
        back = decode_edges(lm, 24, [(p, encode_intervals(r), len(t))
                                     for (p, t), r in zip(jobs, rows, strict=True)])
        assert [b[0] for b in back] == [t for _, t in jobs]
    cursor = Cursor(llama, 24)  # the shared window [24, 30) is run once, not per edge
    for path, tokens in jobs[:4]:
        cursor.seek(path)
        cursor.encode(tokens)
    separate = 0
    for path, tokens in jobs[:4]:
        c = Cursor(llama, 24)
        c.seek(path)
        c.encode(tokens)
        separate += c.steps
    assert cursor.steps < separate


def test_engine_decode_gives_the_encoders_rows(llama):
    """Through the integer engine, decode_edges returns each edge's (start, freq) rows as the
    decoder found them, equal to what encode_edges computes (the store cuts edges with them),
    for edges within one window, crossing a window boundary, and starting on one."""
    from seqkv.store.coding import ENGINE_PROCEDURE, decode_edges, encode_edges

    rng = random.Random(9)
    prefix = [rng.randrange(3, 290) for _ in range(20)]
    jobs = [(prefix, [rng.randrange(3, 290) for _ in range(9)]),  # crosses position 24
            (prefix[:5], [rng.randrange(3, 290) for _ in range(4)]),
            (prefix + [4] * 4, [rng.randrange(3, 290) for _ in range(30)])]  # starts at 24
    rows = encode_edges(llama, 24, jobs, ENGINE_PROCEDURE)
    back = decode_edges(llama, 24, [(p, encode_intervals(r), len(t))
                                    for (p, t), r in zip(jobs, rows, strict=True)],
                        ENGINE_PROCEDURE)
    for (_, tokens), r, (got, got_rows) in zip(jobs, rows, back, strict=True):
        assert got == tokens and np.array_equal(got_rows, r)
