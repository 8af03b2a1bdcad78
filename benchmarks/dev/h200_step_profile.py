"""Profile graph replays of a decode step on the SmolLM2-shaped engine (dev; run as `python3 benchmarks/dev/h200_step_profile.py 1 4` from the repository root on the H200, 2026-11-30 ~21:50 UTC, with the prologue patch applied)."""
import sys, time, torch
from torch.profiler import ProfilerActivity, profile
sys.path.insert(0, "benchmarks")
from engine_kernels import smollm2_shaped
from seqkv.engine import EngineCodec
from seqkv.engine.codec import _DecodeGroup
m = smollm2_shaped().compile()
codec = EngineCodec(m, 1)
for b in [int(x) for x in sys.argv[1:]] or [1]:
    streams = torch.randint(0, m.spec.vocab, (b, 300)).tolist()
    words = codec.encode(streams)
    g = _DecodeGroup(codec, words, [300] * b, [[]] * b)
    g._side_step(g._span(0)); graph = g._graph(g._span(1)); graph.replay(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(100): graph.replay()
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 100
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(10): graph.replay()
        torch.cuda.synchronize()
    ev = [e for e in p.events() if e.device_type.name == "CUDA"]
    tot = sum(e.device_time for e in ev) / 10
    print(f"== {b} streams: replay {dt*1e3:.3f} ms/step ({1/dt:.0f} steps/s), {len(ev)//10} kernels, {tot/1e3:.3f} ms kernel time")
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
