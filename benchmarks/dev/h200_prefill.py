# ruff: noqa: B023, E501  (closures run where they are made; a dev script)
"""The prefill attention kernel (cuda_attention.prefill_attention) on the SmolLM2-shaped engine
with random weights, compiled (dev): the encoder with the kernel on and off side by side (the
same intervals), a sweep of its block shapes at one layer's shapes, and a sweep of the GEMM's
tiles at the encoder's row counts.

    python3 benchmarks/dev/h200_prefill.py [encode] [attention] [gemm] [gemv]   # repo root, CUDA

Output of the runs: benchmarks/results/engine_dev_h200.txt.
"""
import sys
import time

import torch
import triton

sys.path.insert(0, "benchmarks")
from engine_kernels import smollm2_shaped  # noqa: E402

from seqkv.engine import EngineCodec, cuda_attention, cuda_ops  # noqa: E402
from seqkv.engine.model import FRAC, QKV_FRAC  # noqa: E402

what = set(sys.argv[1:]) or {"encode", "attention", "gemm"}


def graph_time(fn, n: int = 20) -> float:
    """us per call, as CUDA-graph replays."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


m = smollm2_shaped().compile()
codec = EngineCodec(m, 1)
if "encode" in what:
    streams = torch.randint(0, m.spec.vocab, (64, 256)).tolist()
    rows = {}
    for fused in (False, True, False, True):
        m.fused_prefill = fused
        codec.intervals(streams)
        torch.cuda.synchronize()
        best = 1e9
        for _ in range(3):
            t = time.perf_counter()
            got = codec.intervals(streams)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        same = all((a == b).all() for a, b in zip(got, rows.get(not fused, got), strict=True))
        rows[fused] = got
        print(f"encode 64x256 fused_prefill={fused}: {64 * 256 / best:,.0f} tok/s "
              f"({best * 1e3:.1f} ms), same intervals as the other: {same}", flush=True)
if "attention" in what:
    b, n_kv, rep, t, d = 64, 3, 3, 256, 64
    lim = m._qkv_limit >> 8  # typical magnitudes, not the bound
    q = torch.randint(-lim, lim, (b, n_kv, rep, t, d), device="cuda")
    k = torch.randint(-lim, lim, (b, t, n_kv, d), device="cuda").transpose(1, 2)
    v = torch.randint(-lim, lim, (b, t, n_kv, d), device="cuda").transpose(1, 2)
    pos = torch.arange(t, device="cuda").expand(b, t)
    allowed = m._allowed(pos, pos, 0)
    want = m._attend(q, k, v, allowed)
    print(f"torch attention (compiled, one block): {graph_time(lambda: m._attend(q, k, v, allowed), 5):.0f} us")
    for window in (0, 64):
        ref = cuda_attention.prefill_attention(q, k, v, window, m.exp_attn_f, m._index_scale_t,
                                               1 << (FRAC - QKV_FRAC))
        if window == 0:
            print("kernel == torch:", torch.equal(ref, want))
        res = []
        for bm in (16, 32, 64, 128):
            for bn in (32, 64):
                for nw in (4, 8):
                    for st in (1, 3):
                        out = torch.empty_like(ref)
                        grid = (triton.cdiv(t, bm), b * n_kv * rep)
                        qc = q.contiguous()

                        def f():
                            cuda_attention._prefill_kernel[grid](
                                qc, k, v, out, m.exp_attn_f, m._index_scale_t, t, t,
                                n_kv * rep, rep, n_kv, window, m.exp_attn_f.shape[0] - 1,
                                *k.stride(), *v.stride(), OUT_SCALE=16, D=d, BM=bm, BN=bn,
                                num_warps=nw, num_stages=st, PDL=False)
                        try:
                            us = graph_time(f)
                            res.append((us, bm, bn, nw, st, torch.equal(out, ref)))
                        except Exception as e:  # noqa: BLE001 - too many registers, etc.
                            res.append((1e9, bm, bn, nw, st, type(e).__name__))
        res.sort()
        print(f"window {window}: best", [f"{us:.0f}us bm{bm} bn{bn} w{nw} s{st} ok={ok}"
                                          for us, bm, bn, nw, st, ok in res[:6]], flush=True)
        default = [r for r in res if r[1:5] == (64, 32, 4, 3)]
        print(f"window {window}: current (64, 32, w4, s3):", default, flush=True)
if "gemm" in what:
    shapes = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576),
              "head": (576, 49152)}
    for name, (kd, n) in shapes.items():
        rows = 4096 if name == "head" else 16384
        w = torch.randint(-127, 128, (2 * n, kd), dtype=torch.int8, device="cuda")
        scale = torch.rand(n, dtype=torch.float64, device="cuda") * 2**-20
        hi = torch.randint(-64, 64, (rows, kd), dtype=torch.int8, device="cuda")
        lo = torch.randint(-64, 64, (rows, kd), dtype=torch.int8, device="cuda")
        k = torch.randint(0, 8, (rows,), dtype=torch.int64, device="cuda")
        ref = cuda_ops.int8_linear(hi, lo, k, w, scale, None)
        res = []
        for bm in (64, 128):
            for bn in (64, 128, 256):
                for bk in (64, 128):
                    for nw in (4, 8):
                        for st in (3,):
                            out = torch.empty_like(ref)
                            grid = (triton.cdiv(rows, bm), triton.cdiv(n, bn))

                            def f():
                                cuda_ops._linear_kernel[grid](
                                    hi, lo, k, w, scale, scale, out, rows, n, kd, HAS_BIAS=False,
                                    BM=bm, BN=bn, BK=bk, num_warps=nw, num_stages=st, PDL=False)
                            try:
                                us = graph_time(f, 5)
                                res.append((us, bm, bn, bk, nw, st, torch.equal(out, ref)))
                            except Exception as e:  # noqa: BLE001
                                res.append((1e9, bm, bn, bk, nw, st, type(e).__name__))
        res.sort()
        cur = [r for r in res if r[1:6] == (64, 64, 64, 4, 3)]
        print(f"GEMM {name} M={rows}: current {cur[0][0]:.0f} us; best",
              [f"{us:.0f}us bm{bm} bn{bn} bk{bk} w{nw} s{st} ok={ok}"
               for us, bm, bn, bk, nw, st, ok in res[:5]], flush=True)
if "gemv" in what:  # one row: narrower column tiles than the current 32 (the head: 128)
    shapes = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576),
              "head": (576, 49152)}
    for name, (kd, n) in shapes.items():
        w = torch.randint(-127, 128, (2 * n, kd), dtype=torch.int8, device="cuda")
        scale = torch.rand(n, dtype=torch.float64, device="cuda") * 2**-20
        hi = torch.randint(-64, 64, (1, kd), dtype=torch.int8, device="cuda")
        lo = torch.randint(-64, 64, (1, kd), dtype=torch.int8, device="cuda")
        k = torch.randint(0, 8, (1,), dtype=torch.int64, device="cuda")
        ref = cuda_ops.int8_linear(hi, lo, k, w, scale, None)
        cur = graph_time(lambda: cuda_ops.int8_linear(hi, lo, k, w, scale, None), 50)
        res = []
        for bn in ((16, 32) if n < 8192 else (64, 128)):
            for bk in (128, 256):
                for nw in (1, 2, 4):
                    for st in (2, 3):
                        out = torch.empty_like(ref)
                        grid = (1, triton.cdiv(n, bn))

                        def f():
                            cuda_ops._linear_kernel[grid](
                                hi, lo, k, w, scale, scale, out, 1, n, kd, HAS_BIAS=False,
                                BM=16, BN=bn, BK=bk, num_warps=nw, num_stages=st, PDL=False)
                        try:
                            us = graph_time(f, 50)
                            res.append((us, bn, bk, nw, st, torch.equal(out, ref)))
                        except Exception as e:  # noqa: BLE001
                            res.append((1e9, bn, bk, nw, st, type(e).__name__))
        res.sort()
        print(f"GEMV {name}: current {cur:.1f} us; best",
              [f"{us:.1f}us bn{bn} bk{bk} w{nw} s{st} ok={ok}" for us, bn, bk, nw, st, ok in res[:5]],
              flush=True)
