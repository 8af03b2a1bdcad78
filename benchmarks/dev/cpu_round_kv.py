"""What rounding keys and values costs in bits (dev; CPU): the engine's bits against the float
model's cross-entropy on N Brown chunks spread over brown256.npy, with the keys and values
rounded to each given number of significant bits (ties to even; "full" = unrounded, engine 2's
numerics; 11 = float16's precision, engine 3's), through the torch prefill.

    python benchmarks/dev/cpu_round_kv.py brown256.npy 32 full 11 8 5 4

Output of 2026-12-01: benchmarks/results/engine_dev_cpu.txt.
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_tokens import engine_bits, float_bits  # noqa: E402

from seqkv.core.models import load_model  # noqa: E402
from seqkv.engine import model as engine_model  # noqa: E402
from seqkv.engine.intops import bit_length  # noqa: E402


def rounded(bits: int | None):
    """model._cached with keys and values kept to ``bits`` significant bits (None: all)."""
    def cached(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if bits is not None:
            x = x.to(torch.int64)
            drop = (bit_length(x) - bits).clamp(min=0)
            q = x.abs() >> drop
            rem = x.abs() - (q << drop)
            half = (1 << drop) >> 1
            q = q + ((rem > half) | ((rem == half) & (half > 0) & (q % 2 == 1))).to(torch.int64)
            x = torch.sign(x) * (q << drop)
        return x.to(dtype)
    return cached


def main() -> None:
    lm = load_model()
    codec = lm.engine_codec()
    ids = np.load(sys.argv[1])
    n = int(sys.argv[2])
    chunks = ids[:: len(ids) // n][:n]
    fb = float_bits(lm, chunks, lm.prime_token())
    for arg in sys.argv[3:]:
        engine_model._cached = rounded(None if arg == "full" else int(arg))
        start = time.time()
        ratio = engine_bits(codec.intervals(chunks.tolist())) / fb
        print(f"{arg:>4} significant bits: {ratio:.6f}x the float model's cross-entropy "
              f"({n} chunks, {time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
