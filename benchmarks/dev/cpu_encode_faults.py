"""Where an encode's minor page faults and seconds go (dev): the first 8 rows of --ids
(256-token chunks) encoded twice, the second measured, with the CPU kernels and IntModel's
steps wrapped to count each call's minor faults (getrusage) and wall time. A fault is a fresh
page of a new tensor, mapped and zeroed by the kernel.

    python benchmarks/dev/cpu_encode_faults.py IDS.npy

Output of 2026-12-02: benchmarks/results/engine_dev_cpu.txt.
"""

import functools
import resource
import sys
import time

import numpy as np
import torch

from seqkv.core.models import load_model
from seqkv.engine import EngineCodec
from seqkv.engine import cpu_kernels as ck
from seqkv.engine import model as engine_model


def counted(owner, name: str, stats: dict) -> None:
    fn = getattr(owner, name, None)
    if fn is None:  # (an older tree)
        return

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        row = stats.setdefault(name, [0, 0.0, 0])
        row[0] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        row[1] += time.perf_counter() - t
        row[2] += 1
        return out

    setattr(owner, name, wrapper)


def main() -> None:
    torch.set_num_threads(2)
    lm = load_model(device="cpu")
    codec = EngineCodec(lm.engine(), lm.prime_token())
    streams = np.load(sys.argv[1])[:8, :256].astype(int).tolist()
    stats: dict = {}
    for name in ("linear", "prefill_attention", "prefill_heads", "gated_activation",
                 "rms_norm", "interval_rows"):
        counted(ck, name, stats)
    for name in ("_qkv", "_heads", "_finish_rows", "prefill_hidden", "intervals"):
        counted(engine_model.IntModel, name, stats)
    codec.encode(streams)
    stats.clear()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    codec.encode(streams)
    print(f"encode: {time.perf_counter() - t:.2f} s, "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults} minor faults")
    for name, (n, s, calls) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:18s} {s:6.3f} s {n:8d} faults {calls:4d} calls")


if __name__ == "__main__":
    main()
