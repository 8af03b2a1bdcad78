"""Where a whole decode's time goes besides its graph replays (dev; CUDA): 1,024 streams x 256
tokens without context, then one stream of 150 tokens after a 300-token context (one edge of a
chat restore), three times each; the group's set-up, context prefill (_load), eager steps,
warm-up and capture timed with a sync around each, then the same group's replays alone.
SmolLM2-shaped engine with random weights, compiled.

    python3 benchmarks/dev/h200_decode_phases.py      # from the repository root

Output of its first copy (the same phases, timed the same way), 2026-12-01 06:55 UTC:
benchmarks/results/engine_dev_h200.txt.
"""

import collections
import functools
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from engine_kernels import smollm2_shaped  # noqa: E402
from timing import timed  # noqa: E402

from seqkv.core.decoders import VectorRansDecoder, encode_stream  # noqa: E402
from seqkv.engine import EngineCodec  # noqa: E402
from seqkv.engine import codec as engine_codec  # noqa: E402

spent: dict[str, float] = collections.defaultdict(float)
calls: collections.Counter = collections.Counter()


def synced(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        spent[name] += time.perf_counter() - t
        calls[name] += 1
        return out
    return wrapper


def main() -> None:
    group_cls = engine_codec._DecodeGroup
    for name in ("__init__", "_load", "_side_step", "_warm_up"):
        setattr(group_cls, name, synced(name, getattr(group_cls, name)))
    capture = synced("capture", group_cls._graph)
    group_cls._graph = lambda self, span: (capture(self, span) if span not in self.graphs
                                           else self.graphs[span])
    m = smollm2_shaped().compile()
    codec = EngineCodec(m, 1)
    print("kept groups' budget GiB", codec._pool.budget / 2**30)
    for b, n, ctx in ((1024, 256, 0), (1, 150, 300)):
        streams = torch.randint(0, m.spec.vocab, (b, ctx + n)).tolist()
        rows = codec.intervals(streams, skip=[ctx] * b)
        words = [encode_stream("ans", r[:, 0], r[:, 1]) for r in rows]
        contexts = [s[:ctx] for s in streams]
        for rep in range(3):
            spent.clear()
            calls.clear()
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = codec.decode(words, [n] * b, contexts)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            print(f"== {b} x {n} (context {ctx}) rep {rep}: {dt:.3f} s, {b * n / dt:,.0f} "
                  f"tok/s, exact {out == [s[ctx:] for s in streams]}, "
                  f"kept {len(codec._pool.free)}")
            for k, v in spent.items():
                print(f"   {k:12s} {v * 1e3:8.1f} ms  x{calls[k]}")
        g = group_cls(codec, b, -(-(ctx + n + 1) // 64) * 64, max(w.size for w in words) + 2)
        g._load(VectorRansDecoder(words, m.device), [n] * b, contexts)
        g._side_step(g._span(0))
        graph = g._graph(g._span(1))
        graph.replay()
        dt = timed(lambda: [graph.replay() for _ in range(n)])[1]
        print(f"   replays alone: {dt / n * 1e3:.3f} ms/step ({b * n / dt:,.0f} tok/s)")
        del g


if __name__ == "__main__":
    main()
