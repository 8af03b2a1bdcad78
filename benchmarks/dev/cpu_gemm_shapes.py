"""The CPU GEMM at an encode's shapes (dev): cpu_kernels.linear for SmolLM2's five layers at
2,048 rows (8 x 256 tokens; the head at its 128-row blocks), random rows and weights, at THREADS
threads: ms a call and GMAC/s.

    python benchmarks/dev/cpu_gemm_shapes.py THREADS

Output of 2026-12-02: benchmarks/results/engine_dev_cpu.txt.
"""

import sys
import time

import torch

from seqkv.engine import cpu_kernels

SHAPES = (("qkv", 960, 576, 2048, 10), ("o", 576, 576, 2048, 10),
          ("gate_up", 3072, 576, 2048, 5), ("down", 576, 1536, 2048, 10),
          ("head", 49152, 576, 128, 5))  # name, columns, depth, rows, calls timed


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]))
    g = torch.Generator().manual_seed(0)
    for name, n, k, m, reps in SHAPES:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        scale = torch.ldexp(torch.ones(n, dtype=torch.float64),
                            -torch.randint(20, 30, (n,), generator=g))
        x = torch.randint(-(1 << 13), 1 << 13, (m, k), generator=g)
        cpu_kernels.linear(x, w, scale, None)
        t = time.perf_counter()
        for _ in range(reps):
            cpu_kernels.linear(x, w, scale, None)
        dt = (time.perf_counter() - t) / reps
        print(f"{name:8s} {m}x{k}x{n}: {dt * 1e3:7.1f} ms  {m * k * n / dt / 1e9:5.1f} GMAC/s",
              flush=True)


if __name__ == "__main__":
    main()
