"""The engine's CPU prefill with torch._int_mm against float32 GEMMs, side by side (dev).

    python benchmarks/dev/cpu_float_gemm.py [STREAMS] [TOKENS]     # from the repository root

On CPUs without VNNI torch._int_mm is a scalar loop; intops picks float32 GEMMs there after a
one-time timing. This encodes the same streams (the bundled news text) both ways, with the
engine's C kernels off so that every GEMM goes through intops, and checks the intervals agree.
Output of the 2026-12-01 run: BENCHMARKS.md (CPU section).
"""

import os
import sys
import time
from pathlib import Path

os.environ["SEQKV_CPU_KERNELS"] = "0"

import torch  # noqa: E402

from seqkv.core.models import load_model  # noqa: E402
from seqkv.engine import EngineCodec, IntModel, integerize, intops  # noqa: E402

streams, tokens = (int(a) for a in (sys.argv[1:] + ["4", "128"])[:2])
lm = load_model()
codec = EngineCodec(IntModel(integerize(lm.model), "cpu"), lm.prime_token())
text = (Path(__file__).resolve().parents[2] / "seqkv" / "data" / "brown_news.txt").read_text()
ids = lm.tokenizer(text).input_ids
rows = [ids[i * 16 : i * 16 + tokens] for i in range(streams)]
print(f"{torch.get_num_threads()} threads, {streams} x {tokens} tokens, "
      f"float GEMMs chosen here: {intops._float_gemm_is_faster()}")
got = {}
for name, faster in (("float32", True), ("_int_mm", False)):
    intops._float_gemm_is_faster = lambda f=faster: f  # noqa: B023 (dev: force one path)
    codec.intervals(rows[:1])
    t = time.perf_counter()
    got[name] = codec.intervals(rows)
    dt = time.perf_counter() - t
    print(f"{name}: encode {streams * tokens / dt:.1f} tokens/s ({dt:.2f} s)", flush=True)
same = all((a == b).all() for a, b in zip(got["float32"], got["_int_mm"], strict=True))
print("same intervals:", same)
