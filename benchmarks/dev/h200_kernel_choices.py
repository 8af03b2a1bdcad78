"""Development script, kept as it ran on the H200 (2026-11-30 ~19:33 UTC, on the working tree
just before commit 2c8164b, where IntModel still had ``triton_linear_rows``, now the boolean
``triton_linear``; it does not run against later trees): decode at 1/64/256/1,024 streams with
the kernel choices side by side, encode with the Triton GEMM at all sizes or not, and profiles
of one step. Output: benchmarks/results/engine_dev_h200.txt.
"""
import sys, time, json, torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM
from seqkv.engine import IntModel, integerize, EngineCodec
from seqkv.engine.codec import _DecodeGroup
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, intermediate_size=1536, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
    max_position_embeddings=8192, rms_norm_eps=1e-5)
w = integerize(LlamaForCausalLM(cfg).eval())
cpu = IntModel(w, "cpu")
m = IntModel(w, "cuda").compile()
def timed(fn):
    torch.cuda.synchronize(); t = time.perf_counter(); r = fn(); torch.cuda.synchronize(); return r, time.perf_counter() - t
ids = torch.randint(0, 49152, (2, 24))
print("prefill gpu==cpu", torch.equal(cpu.prefill_hidden(ids), m.prefill_hidden(ids.cuda()).cpu()), flush=True)
codec = EngineCodec(m, 1)
cfgs = {"new": dict(triton_linear_rows=4096, fused_locate=True, fused_attention_streams=64),
        "new+attn": dict(triton_linear_rows=4096, fused_locate=True, fused_attention_streams=1 << 30),
        "old": dict(triton_linear_rows=0, fused_locate=False, fused_attention_streams=64)}
def use(name):
    for k, v in cfgs[name].items(): setattr(m, k, v)
for nb, n in ((1, 256), (64, 128), (256, 128), (1024, 128)):
    streams = torch.randint(0, 49152, (nb, n)).tolist()
    words = codec.encode(streams)
    names = ["new", "old"] if nb <= 64 else ["new", "new+attn", "old"]
    for name in names + names:
        use(name)
        out, td = timed(lambda: codec.decode(words, [n]*nb))
        print(f"{name} {nb}x{n}: decode {nb*n/td:,.0f} tok/s ({n/td:.0f} steps/s) exact={out == streams}", flush=True)
streams = torch.randint(0, 49152, (64, 256)).tolist()
for rows in (4096, 1 << 30, 4096, 1 << 30):
    m.triton_linear_rows = rows
    _, dt = timed(lambda: codec.intervals(streams))
    print(f"encode 64x256 triton rows<={rows}: {64*256/dt:,.0f} tok/s", flush=True)
use("new")
for nb in (1024, 1):
    streams = torch.randint(0, 49152, (nb, 64)).tolist()
    g = _DecodeGroup(codec, codec.encode(streams), [64] * nb, [[]] * nb)
    span = g._span(0)
    f = lambda: g._step(span)
    f(); f(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        f(); torch.cuda.synchronize()
    ev = [e for e in p.events() if e.device_type.name == "CUDA"]
    print(f"== step {nb} streams: {len(ev)} kernels, {sum(e.device_time for e in ev)/1e3:.2f} ms kernel time", flush=True)
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=70), flush=True)
