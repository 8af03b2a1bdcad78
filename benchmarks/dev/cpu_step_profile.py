"""Where a CPU decode step's time goes (dev): B streams (default 8) stepped through the
engine's CPU kernels (cpu_step.CpuStep) at positions POS.. POS+32 (default 3) of a 512-slot
cache, the step and each kernel family's share (the attention is the library's
decode_attention), 2 threads.

    python benchmarks/dev/cpu_step_profile.py [B] [POS]

Output: benchmarks/results/engine_dev_cpu.txt.
"""

import collections
import sys
import time

import torch

from seqkv.core.models import load_model
from seqkv.engine import cpu_kernels
from seqkv.engine.cpu_step import CpuStep


class _TimedLibrary:
    """The kernels' library, each call's seconds added to ``spent`` under its name."""

    def __init__(self, lib, spent: dict[str, float]) -> None:
        self.lib, self.spent = lib, spent

    def __getattr__(self, name: str):
        fn = getattr(self.lib, name)

        def timed(*a):
            t = time.perf_counter()
            out = fn(*a)
            self.spent[name] += time.perf_counter() - t
            return out

        return timed


def main() -> None:
    torch.set_num_threads(2)
    b = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    first = int(sys.argv[2]) if len(sys.argv) > 2 else 3
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
    step.lib = _TimedLibrary(step.lib, spent)
    cache = step.new_cache(b, 512)
    tokens = torch.full((b,), 5)
    for i in range(first - 3, first):
        step.pmf(cache, tokens, torch.full((b,), max(i, 0)))
    spent.clear()
    n = 30
    t = time.perf_counter()
    for i in range(first, first + n):
        step.pmf(cache, tokens, torch.full((b,), i))
    per = (time.perf_counter() - t) / n
    shares = "  ".join(f"{k} {v / n * 1e3:.2f}" for k, v in sorted(spent.items(),
                                                                    key=lambda kv: -kv[1]))
    print(f"B={b} positions {first}-{first + n - 1}: step {per * 1e3:.2f} ms  {shares}")


if __name__ == "__main__":
    main()
