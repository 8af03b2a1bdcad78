"""Where a GPU decode step and a prefill of the integer engine spend their time (torch.profiler).

    python benchmarks/engine_profile.py --ids brown256.npy --streams 1024 --out DIR

Prints the top CUDA kernels of one eager decode step at --streams streams (span 256) and of one
prefill of 64 x 256 tokens, and the kernel count per step; writes DIR/engine_profile.txt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

import seqkv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ids", required=True)
    ap.add_argument("--streams", type=int, default=1024)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    lm = seqkv.load_model(device="cuda")
    m = lm.engine()
    ids = torch.as_tensor(np.load(args.ids)[: args.streams], dtype=torch.long, device="cuda")
    b = ids.shape[0]
    cache = m.new_cache(b, 256)
    m.prefill_hidden(ids[:, :200], cache=cache)
    pos = torch.full((b,), 200, device="cuda")
    m.pmf(m.step_logits(cache, ids[:, 200], pos, 256))
    torch.cuda.synchronize()
    report = []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        m.pmf(m.step_logits(cache, ids[:, 200], pos, 256))
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    report.append(f"decode step, {b} streams: {len(events)} kernels, "
                  f"{sum(e.device_time for e in events) / 1e3:.1f} ms of kernel time")
    report.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        h = m.prefill_hidden(ids[:64])
        for _ in m.head_pmf(h.reshape(-1, h.shape[-1])):
            pass
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    report.append(f"prefill 64 x 256: {len(events)} kernels, "
                  f"{sum(e.device_time for e in events) / 1e3:.1f} ms of kernel time")
    report.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    text = "\n".join(report)
    (Path(args.out) / "engine_profile.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
