"""Wall-clock timing for the benchmarks: synchronize the GPU (if any) on both sides."""

from __future__ import annotations

import time

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    """(fn(), seconds it took), with queued GPU work counted in."""
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - t0


def kernel_table(prof, n: int, rows: int = 18) -> None:
    """Print a torch.profiler run's CUDA kernels per iteration (n iterations profiled): their
    count and total time, then the costliest by name."""
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    agg: dict[str, list] = {}
    for e in events:
        a = agg.setdefault(e.name[:70], [0, 0.0])
        a[0] += 1
        a[1] += e.device_time
    total = sum(e.device_time for e in events) / n / 1e3
    print(f"   {len(events) // n} kernels, {total:.3f} ms kernel time")
    for name, (count, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:rows]:
        print(f"   {t / n / 1e3:8.3f} ms {count // n:5d}x  {name}")


def graph_us(fn, n: int = 20, tries: int = 3) -> float:
    """Microseconds a call of fn, as n calls captured in one CUDA graph: the best of
    ``tries`` replays (after one to warm up)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    graph.replay()
    best = float("inf")
    for _ in range(tries):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best
