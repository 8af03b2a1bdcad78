"""One CPU GEMM's rate (dev): cpu_kernels.linear on a 3,072 x 576 layer (SmolLM2's gate and up
projections) over 256 random rows, one thread, timed over REPS calls.

    OMP_NUM_THREADS=1 python benchmarks/dev/cpu_gemm_one.py [REPS]

Run it in two trees back to back (PYTHONPATH=TREE) to compare kernels; output of 2026-12-01:
benchmarks/results/engine_dev_cpu.txt.
"""

import sys
import time

import torch

from seqkv.engine import cpu_kernels


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n, k, m = 3072, 576, 256
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.ldexp(torch.ones(n, dtype=torch.float64),
                        -torch.randint(20, 30, (n,), generator=g))
    x = torch.randint(-(1 << 20), 1 << 20, (m, k), generator=g)
    cpu_kernels.linear(x, w, scale, None)
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    t = time.perf_counter()
    for _ in range(reps):
        cpu_kernels.linear(x, w, scale, None)
    dt = (time.perf_counter() - t) / reps
    print(f"{dt * 1e3:.2f} ms  {n * k * m / dt / 1e9:.1f} GMAC/s")


if __name__ == "__main__":
    main()
