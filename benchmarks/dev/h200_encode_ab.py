"""The encoder (codec.intervals, 1,024 x 256 random tokens: four groups of 65,536 rows) with
the qkv and gate_up GEMMs' outputs in int64 or int32 (IntModel._int32_outputs), alternating in
one process (dev; CUDA; SmolLM2-shaped engine, random weights,
compiled). Checks that every variant gives the same rows; prints tokens/s per run and a
kernel table of one group for the first and last variants.

    python3 benchmarks/dev/h200_encode_ab.py [ROUNDS]      # from the repository root

(Its first version, 2026-12-01 15:00 UTC, alternated the head's logits in int64 or int32 and
the GEMMs' programs in row-first or column-first order: BENCHMARKS.md.)
"""
import sys

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "benchmarks")
from engine_kernels import smollm2_shaped  # noqa: E402
from timing import kernel_table, timed  # noqa: E402

from seqkv.engine import EngineCodec  # noqa: E402

m = smollm2_shaped().compile()
narrow = dict(m._int32_outputs)
print(f"{len(narrow)} GEMMs with int32 outputs")
VARIANTS = {"int64 qkv and gate_up (before)": {}, "int32 qkv and gate_up (now)": narrow}
codec = EngineCodec(m, 1)
streams = torch.randint(0, m.spec.vocab, (1024, 256), generator=torch.Generator().manual_seed(0))
streams = streams.tolist()
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
want = None
speeds: dict[str, list[float]] = {v: [] for v in VARIANTS}
for r in range(rounds + 1):
    for name, outputs in VARIANTS.items():
        m._int32_outputs = outputs
        rows, dt = timed(lambda: codec.intervals(streams))
        if want is None:
            want = rows
        assert all(np.array_equal(a, b) for a, b in zip(rows, want, strict=True)), name
        if r:  # round 0 compiles and warms up
            speeds[name].append(1024 * 256 / dt)
for name, s in speeds.items():
    print(f"== {name}: " + " / ".join(f"{x:,.0f}" for x in s) + f" tok/s (median "
          f"{sorted(s)[len(s) // 2]:,.0f}), rows equal", flush=True)
for name in (list(VARIANTS)[0], list(VARIANTS)[-1]):
    m._int32_outputs = VARIANTS[name]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        codec.intervals(streams[:256])
        torch.cuda.synchronize()
    print(f"== {name}, one group of 256 x 256:")
    kernel_table(prof, 1, 16)
