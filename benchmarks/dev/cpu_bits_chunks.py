"""The engine's bits per Brown chunk against the float model's cross-entropy (dev; CPU): the
first 8 chunks of brown256.npy one by one, then every 16th (64 chunks) together.

    python benchmarks/dev/cpu_bits_chunks.py brown256.npy

Output of 2026-12-01 (engine 2, 2-core EPYC): benchmarks/results/engine_dev_cpu.txt.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_tokens import engine_bits, float_bits  # noqa: E402

from seqkv.core.models import load_model  # noqa: E402


def main() -> None:
    lm = load_model()
    codec = lm.engine_codec()
    ids = np.load(sys.argv[1])
    first = ids[:8]
    rows = codec.intervals(first.tolist())
    for i, (chunk, r) in enumerate(zip(first, rows, strict=True)):
        fb = float_bits(lm, chunk[None], lm.prime_token())
        print(f"chunk {i}: {engine_bits([r]) / fb:.5f}x ({fb / len(chunk):.3f} bits/token)")
    print(f"first 8: {engine_bits(rows) / float_bits(lm, first, lm.prime_token()):.5f}x")
    every = ids[::16]
    ratio = engine_bits(codec.intervals(every.tolist())) / float_bits(lm, every, lm.prime_token())
    print(f"every 16th ({len(every)} chunks): {ratio:.5f}x")


if __name__ == "__main__":
    main()
