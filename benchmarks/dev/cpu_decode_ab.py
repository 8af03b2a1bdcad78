"""CPU speed of one tree (dev): the first 8 rows of --ids (256-token chunks) encoded, then
decoded as 8 streams together and the first alone, twice each; the better of the two rates,
every decode checked exact (encode: the better of two more encodes after the first). Run it
alternately against two checkouts to compare them on a noisy machine (each line one process,
2 threads):

    for i in 1 2 3; do for tree in /tmp/base .; do
      PYTHONPATH=$tree python benchmarks/dev/cpu_decode_ab.py .carry/brown256.npy; done; done

Output of 2026-12-01: benchmarks/results/engine_dev_cpu.txt.
"""

import sys
import time

import numpy as np
import torch

from seqkv.core.models import load_model
from seqkv.engine import EngineCodec


def main() -> None:
    torch.set_num_threads(2)
    lm = load_model(device="cpu")
    codec = EngineCodec(lm.engine(), lm.prime_token())
    streams = np.load(sys.argv[1])[:8, :256].astype(int).tolist()
    words = codec.encode(streams)
    codec.decode(codec.encode([streams[0][:16]]), [16])  # warm-up: tables, packed weights
    encode = []
    for _ in range(2):
        t = time.perf_counter()
        assert all(np.array_equal(a, b) for a, b in zip(codec.encode(streams), words,
                                                            strict=True))
        encode.append(sum(len(s) for s in streams) / (time.perf_counter() - t))
    eight, one = [], []
    for _ in range(2):
        t = time.perf_counter()
        assert codec.decode(words, [len(s) for s in streams]) == streams
        eight.append(sum(len(s) for s in streams) / (time.perf_counter() - t))
        t = time.perf_counter()
        assert codec.decode(words[:1], [len(streams[0])]) == streams[:1]
        one.append(len(streams[0]) / (time.perf_counter() - t))
    print(f"encode {max(encode):.1f} tokens/s, 8 streams {max(eight):.1f} tokens/s, "
          f"one stream {max(one):.1f} steps/s")


if __name__ == "__main__":
    main()
