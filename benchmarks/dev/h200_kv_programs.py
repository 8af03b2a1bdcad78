"""Decode attention per key/value head against per query head (dev; CUDA): whole 256-token
decodes of 256 and 1,024 streams (every token checked) with cuda_attention's
KV_PROGRAMS_MIN_HEADS on and off, and their graph replays' mean step over positions 1-256.
SmolLM2-shaped engine with random weights, compiled. Needs h200_kv_programs.patch applied
(tried and dropped: slower).

    python3 benchmarks/dev/h200_kv_programs.py      # from the repository root
"""

import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from engine_kernels import smollm2_shaped  # noqa: E402
from timing import timed  # noqa: E402

from seqkv.core.decoders import VectorRansDecoder  # noqa: E402
from seqkv.engine import EngineCodec, cuda_attention  # noqa: E402
from seqkv.engine.codec import _DecodeGroup  # noqa: E402


def main() -> None:
    m = smollm2_shaped().compile()
    codec = EngineCodec(m, 1, pool_bytes=0)
    default = cuda_attention.KV_PROGRAMS_MIN_HEADS
    for b in (1024, 256):
        streams = torch.randint(0, m.spec.vocab, (b, 256)).tolist()
        words = codec.encode(streams)
        for setting in (default, None, default, None):
            cuda_attention.KV_PROGRAMS_MIN_HEADS = setting
            codec.decode(words[:b], [256] * b)  # compiles and captures this setting's step
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = codec.decode(words, [256] * b)
            dt = time.perf_counter() - t
            g = _DecodeGroup(codec, b, 320, max(w.size for w in words) + 2)
            g._load(VectorRansDecoder(words, m.device), [256] * b, [[]] * b)
            g._side_step(g._span(0))
            graph = g._graph(g._span(1))
            step = timed(lambda: [graph.replay() for _ in range(255)])[1] / 255
            del g
            print(f"{b} streams, per-kv-head from {setting}: decode {b * 256 / dt:,.0f} tok/s "
                  f"(exact {out == streams}); replays {step * 1e3:.3f} ms/step "
                  f"({b / step:,.0f} tok/s)", flush=True)


if __name__ == "__main__":
    main()
