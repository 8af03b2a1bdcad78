"""CPU decode steps with the step's intermediate rows kept from step to step (CpuStep._rows)
against a fresh tensor for each, interleaved in one process (dev): 12 rounds of 40 steps of
one stream and of 8, medians. The default model, 2 threads.

    python benchmarks/dev/cpu_kept_rows_ab.py      # from the repository root

Output of 2026-12-01 18:15 UTC: benchmarks/results/engine_dev_cpu.txt.
"""

import time

import torch

from seqkv.core.models import load_model
from seqkv.engine.cpu_step import CpuStep


def main() -> None:
    torch.set_num_threads(2)
    step = CpuStep.for_model(load_model(device="cpu").engine())
    kept = CpuStep._rows

    def fresh(self, key, m, n):
        return torch.empty((m, n), dtype=torch.int64)

    for b in (1, 8):
        cache = step.new_cache(b, 300)
        tokens = torch.zeros(b, dtype=torch.long)
        times: dict[str, list[float]] = {"kept": [], "fresh": []}
        for r in range(12):
            order = (("kept", kept), ("fresh", fresh))
            for name, rows in order if r % 2 else order[::-1]:
                CpuStep._rows = rows
                t = time.perf_counter()
                for p in range(40):
                    step.pmf(cache, tokens, torch.full((b,), p))
                times[name].append((time.perf_counter() - t) / 40 * 1e3)
        CpuStep._rows = kept
        for name, v in times.items():
            v = sorted(v)
            print(f"{b} streams, rows {name}: median {v[len(v) // 2]:.2f} ms a step, "
                  f"min {v[0]:.2f}")


if __name__ == "__main__":
    main()
