"""The store's per-path context is run_lockstep's canonical procedure, bit for bit."""

import random

import numpy as np
import torch

from seqkv.distribution import symbol_intervals
from seqkv.stepper import run_lockstep
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
