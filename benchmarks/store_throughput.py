"""PLT store throughput: sessions/s and tokens/s for put (durable, raw), compaction (coding
under the model) and get (decode in a fresh store).

    python benchmarks/store_throughput.py [--device cpu|cuda] [--sessions 8] [--tokens 128]
        [--shared 64] [--out benchmarks/results/store_throughput.json]

Sessions share a ``--shared``-token prefix (Brown news) and continue with their own text. The
store's canonical procedure runs one stream token by token (batch 1), so on a GPU this measures
the per-step overhead the BRIEF describes, not the arithmetic.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from corpora import brown  # noqa: E402

from seqkv.core.models import load_model  # noqa: E402
from seqkv.store import Store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--shared", type=int, default=64)
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2)")
    ap.add_argument("--texts", default=None, help="JSON list of texts (default: Brown news)")
    ap.add_argument("--db", default=None, help="store URL (default: a temporary SQLite file)")
    ap.add_argument("--out", default="benchmarks/results/store_throughput.json")
    a = ap.parse_args()
    lm = load_model(a.model, device=a.device)
    tok = lm.tokenizer
    texts = json.loads(Path(a.texts).read_text()) if a.texts else brown("a", a.sessions + 1)
    prefix = tok(texts[0]).input_ids[: a.shared]
    sessions = [(f"s{i}", prefix + tok(t).input_ids[: a.tokens - a.shared])
                for i, t in enumerate(texts[1:])]
    with tempfile.TemporaryDirectory() as tmp:
        db = a.db or str(Path(tmp) / "store.db")
        s = Store(db, lm)
        t0 = time.perf_counter()
        for name, ids in sessions:
            s.put(name, ids, replace=True)
        put_s = time.perf_counter() - t0  # durable as raw edges
        t0 = time.perf_counter()
        s.compact()  # coded under the model, one stream at a time
        compact_s = time.perf_counter() - t0
        fresh = Store(db, lm)
        t0 = time.perf_counter()
        for name, ids in sessions:
            assert fresh.get_ids(name) == ids
        get_s = time.perf_counter() - t0
        st = s.stats()
    n, toks = len(sessions), sum(len(ids) for _, ids in sessions)
    row = {"device": a.device, "machine": platform.machine(), "sessions": n, "tokens": toks,
           "tokens_unique": st["tokens_unique"], "put_s": put_s, "compact_s": compact_s,
           "compact_unique_tokens_per_s": st["tokens_unique"] / compact_s, "get_s": get_s,
           "put_sessions_per_s": n / put_s, "put_tokens_per_s": toks / put_s,
           "get_sessions_per_s": n / get_s, "get_tokens_per_s": toks / get_s,
           "bits_per_unique_token": st["bits_per_unique_token"]}
    print(json.dumps(row, indent=2))
    Path(a.out).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
