"""cuda_rows' kernels against the compiled torch functions they replace, on a CUDA GPU.

SmolLM2's widths (hidden 576, gate_up 3072), rows 1, 256, 1024, 16384: each case checked for
equal integers, then timed as CUDA-graph replays (20 calls a graph, the median of 30
replays: the GPU's time per call without Python's launch cost) and with triton's do_bench
(eager launches). Prints a table; GB/s counts each input read and each output written once.

Usage (repository root, CUDA machine):
    PYTHONPATH=$PWD python3 benchmarks/dev/h200_bench_rows.py [--rows 1,256,1024,16384]
        [--warps 2,4,8] [--variants other/cuda_rows.py,...]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys

import torch
import triton.testing

from seqkv.engine import cuda_rows, model, tables
from seqkv.engine.weights import IntNorm

HIDDEN, INTER = 576, 1536


def load(path: str):
    """A copy of cuda_rows.py as a module of seqkv.engine (for its relative imports)."""
    name = "seqkv.engine." + os.path.basename(path)[:-3]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def graph_us(fn, calls: int = 20, replays: int = 30) -> float:
    """GPU microseconds per call of fn, replayed from a CUDA graph of ``calls`` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def eager_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median") * 1e3


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def norm(gen: torch.Generator, frac: int = 14) -> IntNorm:
    gain = torch.randint(-(1 << 15), 1 << 15, (HIDDEN,), generator=gen, dtype=torch.int64)
    return IntNorm(gain.cuda(), frac, 42949)


def cases(rows: int, gen: torch.Generator):
    """(name, torch function, kernel, args, bytes moved)."""
    h = torch.randint(-(1 << 24), 1 << 24, (rows, HIDDEN), generator=gen).cuda()
    d = torch.randint(-(1 << 22), 1 << 22, (rows, HIDDEN), generator=gen).cuda()
    # gates ~ N(0, 2.0) and ups ~ N(0, 1.0) in real units (Q16): the table's middle
    gu = torch.randn(rows, 2 * INTER, generator=gen, dtype=torch.float64) * 2.0**16
    gu[:, :INTER] *= 2
    gu = gu.to(torch.int64).cuda()
    table = torch.from_numpy(tables.sigmoid_table()).cuda()
    n, post = norm(gen), norm(gen, 12)
    split = rows * HIDDEN * 2 + rows * 8  # hi, lo, k
    return [
        ("norm", model.residual_norm_split, cuda_rows.norm_split, (h, None, None, n),
         rows * HIDDEN * 8 + split),
        ("norm+delta", model.residual_norm_split, cuda_rows.norm_split, (h, d, None, n),
         rows * HIDDEN * 24 + split),
        ("norm+delta+post", model.residual_norm_split, cuda_rows.norm_split, (h, d, post, n),
         rows * HIDDEN * 24 + split),
        ("act", model.activation_split, cuda_rows.act_split, (table, gu),
         rows * INTER * 18 + rows * 8),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,256,1024,16384")
    ap.add_argument("--warps", default="", help="also time these num_warps (comma list)")
    ap.add_argument("--only", default="", help="case names to run (comma list)")
    ap.add_argument("--variants", default="", help="other copies of cuda_rows.py to time too")
    args = ap.parse_args()
    variants = [load(p) for p in args.variants.split(",") if p]
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = 256
    compiled = {f: torch.compile(f, dynamic=False)
                for f in (model.residual_norm_split, model.activation_split)}
    default_warps = cuda_rows._warps
    warps = [int(w) for w in args.warps.split(",") if w]
    gen = torch.Generator().manual_seed(0)
    lines = []
    for rows in (int(r) for r in args.rows.split(",")):
        for name, ref, kernel, a, nbytes in cases(rows, gen):
            if args.only and name not in args.only.split(","):
                continue
            fused = compiled[ref]
            ok = same(kernel(*a), ref(*a)) and same(kernel(*a), fused(*a))
            t_ref = graph_us(lambda: fused(*a))  # noqa: B023
            t_ref_e = eager_us(lambda: fused(*a))  # noqa: B023
            t_new = graph_us(lambda: kernel(*a))  # noqa: B023
            t_new_e = eager_us(lambda: kernel(*a))  # noqa: B023
            extra = []
            for w in warps:
                cuda_rows._warps = lambda *_, w=w: w
                extra.append(f"w{w}:{graph_us(lambda: kernel(*a)):.1f}")  # noqa: B023
                cuda_rows._warps = default_warps
            for v in variants:
                fn = getattr(v, kernel.__name__)
                ok = ok and same(fn(*a), ref(*a))
                extra.append(f"{v.__name__[-2:]}:{graph_us(lambda: fn(*a)):.1f}")  # noqa: B023
            line = (f"{name:16s} {rows:6d} {t_ref:9.1f} {t_new:9.1f} {t_ref / t_new:6.2f}x "
                    f"{nbytes / t_new / 1e3:8.0f} {t_ref_e:9.1f} {t_new_e:9.1f}  "
                    f"{'equal' if ok else 'DIFFERENT'} {' '.join(extra)}")
            print(line, flush=True)
            lines.append(line)
    print(f"\n{torch.cuda.get_device_name()}; us per call; graph = CUDA-graph replay, "
          "eager = do_bench")
    print(f"{'case':16s} {'rows':>6s} {'compiled':>9s} {'kernel':>9s} {'speedup':>7s} "
          f"{'GB/s':>8s} {'c.eager':>9s} {'k.eager':>9s}  check")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
