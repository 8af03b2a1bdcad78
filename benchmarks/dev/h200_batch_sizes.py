"""Restores in batches of varying size, as a server forms them (dev; CUDA): --sessions Brown
sessions put and compacted, then get_many over batches of 3, 4, 5, 7, 8, 12, 16, 20, 31, 32
sessions (twice through the list), each by a fresh Store; seconds per batch and the decode
groups built, with the codec rounding group streams up (the GPU default) and without.

    python3 benchmarks/dev/h200_batch_sizes.py --model ~/gg/smol.gguf --texts brown_a.json
    python3 benchmarks/dev/h200_batch_sizes.py --device cpu --sessions 8 --tokens 24 \\
        --sizes 3,4,3     (a smoke test)
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, "benchmarks")
from store_gpu import chunks, compaction, load_texts, sync  # noqa: E402

from seqkv.core.models import load_model  # noqa: E402
from seqkv.engine import codec as engine_codec  # noqa: E402
from seqkv.store import Store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--texts")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--sizes", default="3,4,5,7,8,12,16,20,31,32")
    a = ap.parse_args()
    lm = load_model(a.model, device=a.device)
    if a.device == "cuda":
        lm.engine().compile()
    sessions = chunks(lm.tokenizer, load_texts(a.texts)[:-1], a.sessions, a.tokens)
    sizes = [int(x) for x in a.sizes.split(",")] * 2
    made = []
    real_init = engine_codec._DecodeGroup.__init__

    def counting_init(self, *args):
        made.append(args[1])
        real_init(self, *args)

    engine_codec._DecodeGroup.__init__ = counting_init
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "store.db")
        compaction(db, lm, sessions, a.device)
        codec = lm.engine_codec()
        for rounding in (True, False, True):
            codec._pool.clear()
            codec._pool.round_streams = rounding
            made.clear()
            seconds = []
            for i, n in enumerate(sizes):
                names = [f"s{(i * 7 + j) % len(sessions)}" for j in range(n)]
                fresh = Store(db, lm)
                sync(a.device)
                t = time.perf_counter()
                out = fresh.get_many(names)
                sync(a.device)
                seconds.append(time.perf_counter() - t)
                assert out == [sessions[int(x[1:])] for x in names]
            print(f"== rounding {rounding}: {sum(seconds):.2f} s over {len(sizes)} batches, "
                  f"groups built {made}")
            print("   " + " ".join(f"{n}:{s:.3f}" for n, s in zip(sizes, seconds, strict=True)))


if __name__ == "__main__":
    main()
