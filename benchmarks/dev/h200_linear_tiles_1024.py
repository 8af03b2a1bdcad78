"""Development script, kept as it ran on the H200 (2026-11-30 ~19:31 UTC, same tree as
h200_linear_tiles.py): the tile sweep at 1,024 rows. Output: benchmarks/results/engine_dev_h200.txt.
"""
import time, types, torch, triton
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM
from seqkv.engine import IntModel, integerize, EngineCodec, cuda_ops
from seqkv.engine.codec import _DecodeGroup
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, intermediate_size=1536, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
    max_position_embeddings=8192, rms_norm_eps=1e-5)
m = IntModel(integerize(LlamaForCausalLM(cfg).eval()), "cuda").compile()
codec = EngineCodec(m, 1)
def prof_table(fn, title, rows=22):
    fn(); fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn(); torch.cuda.synchronize()
    ev = [e for e in p.events() if e.device_type.name == "CUDA"]
    print(f"== {title}: {len(ev)} kernels, {sum(e.device_time for e in ev)/1e3:.2f} ms kernel time", flush=True)
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=80), flush=True)
# int8_linear configs at M rows
shapes = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576), "head": (576, 49152)}
def bench(fn, n=50):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n): fn()
    g.replay(); torch.cuda.synchronize()
    t = time.perf_counter(); g.replay(); torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6
for M in (1024,):
    for name, (K, N) in shapes.items():
        w = torch.randint(-127, 128, (2 * N, K), dtype=torch.int8, device="cuda")
        scale = torch.rand(N, dtype=torch.float64, device="cuda") * 2**-20
        hi = torch.randint(-64, 64, (M, K), dtype=torch.int8, device="cuda")
        lo = torch.randint(-64, 64, (M, K), dtype=torch.int8, device="cuda")
        k = torch.randint(0, 8, (M, 1), dtype=torch.int64, device="cuda")
        lin = types.SimpleNamespace(w=w, scale=scale, bias=None)
        ref = m._split_linear(hi, lo, k, lin)
        t_ref = bench(lambda: m._split_linear(hi, lo, k, lin))
        res = []
        for bn in (64, 128):
            for bk in (64, 128):
                for nw in (4, 8):
                    for st in (3,):
                      for bm in (64, 128):
                        out = torch.empty((M, N), dtype=torch.int64, device="cuda")
                        grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
                        f = lambda: cuda_ops._linear_kernel[grid](hi, lo, k.reshape(-1), w, scale, scale, out, M, N, K,
                              HAS_BIAS=False, BM=bm, BN=bn, BK=bk, num_warps=nw, num_stages=st, PDL=False)
                        try:
                            t = bench(f)
                        except Exception as e:
                            continue
                        ok = torch.equal(out, ref)
                        res.append((t, bn, bk, nw, bm, ok))
        res.sort()
        print(f"M={M} {name} K={K} N={N}: torch(int_mm+epilogue) {t_ref:.1f} us; best triton:", [f"{t:.1f}us bn{bn} bk{bk} w{nw} bm{st} ok={ok}" for t, bn, bk, nw, st, ok in res[:4]], flush=True)
