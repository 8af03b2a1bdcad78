"""Decode-step graph replays on the SmolLM2-shaped engine (random weights, compiled) with the
fused attention's key splits chosen per group size (cuda_attention.TARGET_PROGRAMS), and the
fused int32-cache attention against the float64 GEMMs at 1,024 streams (dev). Each config
replays the same 40 steps from the same state; the decoded tokens must be equal across
configs.

    python3 benchmarks/dev/h200_attn_splits.py        # from the repository root, CUDA

Output of the runs: benchmarks/results/engine_dev_h200.txt.
"""
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from engine_kernels import smollm2_shaped  # noqa: E402

from seqkv.core.decoders import VectorRansDecoder  # noqa: E402
from seqkv.engine import EngineCodec, cuda_attention  # noqa: E402
from seqkv.engine.codec import _DecodeGroup  # noqa: E402

m = smollm2_shaped().compile()
codec = EngineCodec(m, 1)
for b in (1, 16, 256, 1024):
    streams = torch.randint(0, m.spec.vocab, (b, 300)).tolist()
    words = codec.encode(streams)
    ref = None
    configs = [(None, False), (2048, False), (4096, False), (8192, False), (16384, False)]
    if b == 1024:
        configs.append((None, True))
    for target, f64 in configs:
        cuda_attention.TARGET_PROGRAMS = target
        m.fused_attention_streams = 0 if f64 else 1 << 20
        g = _DecodeGroup(codec, b, 320, max(w.size for w in words) + 2)
        g._load(VectorRansDecoder(words, m.device), [300] * b, [[100]] * b)
        g._side_step(g._span(0))
        graph = g._graph(320 if f64 else g._span(1))  # float64: the whole capacity
        for _ in range(39):
            graph.replay()
        torch.cuda.synchronize()
        out = g.out[:, :40].clone()
        same = ref is None or torch.equal(out, ref)
        ref = out if ref is None else ref
        t = time.perf_counter()
        for _ in range(50):
            graph.replay()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / 50
        print(f"{b:5d} streams target {target} {'float64 GEMMs' if f64 else 'fused int32'}: "
              f"{dt * 1e3:.3f} ms/step ({b / dt:,.0f} tok/s) same tokens: {same}", flush=True)
        del g, graph
        torch.cuda.empty_cache()
