"""Where a CPU decode step's time goes (dev): B streams (default 8) stepped through the
engine's CPU kernels (cpu_step.CpuStep) at positions 3-32 of a 512-slot cache, the step and
each kernel family's share, 2 threads.

    python benchmarks/dev/cpu_step_profile.py [B]

Output of 2026-12-01: benchmarks/results/engine_dev_cpu.txt.
"""

import collections
import sys
import time

import torch

from seqkv.core.models import load_model
from seqkv.engine import cpu_kernels
from seqkv.engine.cpu_step import CpuStep


def main() -> None:
    torch.set_num_threads(2)
    b = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    step = CpuStep.for_model(load_model().engine())
    spent: dict[str, float] = collections.defaultdict(float)
    for name in ("linear", "norm_linear", "gated_activation", "pmf_rows"):
        kernel = getattr(cpu_kernels, name)

        def timed(*a, kernel=kernel, name=name, **kw):
            t = time.perf_counter()
            out = kernel(*a, **kw)
            spent[name] += time.perf_counter() - t
            return out

        setattr(cpu_kernels, name, timed)
    cache = step.new_cache(b, 512)
    tokens = torch.full((b,), 5)
    for i in range(3):
        step.pmf(cache, tokens, torch.full((b,), i))
    spent.clear()
    n = 30
    t = time.perf_counter()
    for i in range(3, 3 + n):
        step.pmf(cache, tokens, torch.full((b,), i))
    per = (time.perf_counter() - t) / n
    shares = "  ".join(f"{k} {v / n * 1e3:.2f}" for k, v in sorted(spent.items(),
                                                                    key=lambda kv: -kv[1]))
    print(f"B={b} step {per * 1e3:.2f} ms  {shares}")


if __name__ == "__main__":
    main()
