"""Profile the compiled encode (64 x 256 tokens) and graph replays of a decode step at several
group sizes, on the SmolLM2-shaped engine with random weights (dev).

    python3 benchmarks/dev/h200_prof_all.py 1 256 1024      # from the repository root, CUDA
    ROWS=0 ...   the compiled torch row functions instead of cuda_rows' kernels
    ENCODE=0 ... decode steps only
    SHOW=40 ...  kernels listed per profile (default 18)

Output of the 2026-11-30/12-01 runs: benchmarks/results/engine_dev_h200.txt. Those ran an
earlier copy of this script: groups of capacity 302 (23:40 UTC) and 512 (00:05, 00:23), where
this one makes 320, the capacity a kept group of these decodes has now; its 1,024-stream
replays run one span's graph past that span's positions (a profile, not a decode).
"""
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "benchmarks")
from engine_kernels import smollm2_shaped  # noqa: E402
from timing import kernel_table, timed  # noqa: E402

from seqkv.core.decoders import VectorRansDecoder  # noqa: E402
from seqkv.engine import EngineCodec  # noqa: E402
from seqkv.engine.codec import _DecodeGroup  # noqa: E402


m = smollm2_shaped().compile()
m.row_kernels = m.row_kernels and os.environ.get("ROWS", "1") == "1"
codec = EngineCodec(m, 1)
print("row kernels", m.row_kernels)
if os.environ.get("ENCODE", "1") == "1":
    streams = torch.randint(0, m.spec.vocab, (64, 256)).tolist()
    for _ in range(2):
        codec.intervals(streams)
    torch.cuda.synchronize()
    t = time.perf_counter()
    codec.intervals(streams)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    print(f"== encode 64x256: {64 * 256 / dt:,.0f} tok/s ({dt * 1e3:.1f} ms)")
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        codec.intervals(streams)
        torch.cuda.synchronize()
    kernel_table(p, 1, 25)
for b in [int(x) for x in sys.argv[1:]] or [1, 256, 1024]:
    streams = torch.randint(0, m.spec.vocab, (b, 300)).tolist()
    words = codec.encode(streams)
    # capacity 320: the multiple of 64 a kept group of these decodes has (codec._GroupPool)
    g = _DecodeGroup(codec, b, 320, max(w.size for w in words) + 2)
    g._load(VectorRansDecoder(words, m.device), [300] * b, [[100]] * b)
    g._side_step(g._span(0))
    graph = g._graph(g._span(1))
    graph.replay()
    dt = timed(lambda: [graph.replay() for _ in range(50)])[1] / 50
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
    print(f"== {b} streams (cache {g.cache.dtype}): replay {dt * 1e3:.3f} ms/step "
          f"({1 / dt:.0f} steps/s, {b / dt:,.0f} tok/s)")
    kernel_table(p, 10, int(os.environ.get("SHOW", "18")))
