"""Where a 256-session restore's time goes (dev; CUDA): store_gpu.py's "many" part (256
Brown sessions put, compacted, then restored together by a fresh Store's get_many, three
times), with a sync around each phase: the store's rounds, the codec's decodes (streams,
steps, capacity) and, inside them, the decode group's set-up, context prefill, eager steps,
warm-up, capture and replays.

    python3 benchmarks/dev/h200_store_phases.py --model ~/gg/smol.gguf --texts brown_a.json
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "benchmarks/dev")
from h200_decode_phases import calls, spent, synced  # noqa: E402
from store_gpu import chunks, compaction, load_texts  # noqa: E402

from seqkv.core.models import load_model  # noqa: E402
from seqkv.engine import codec as engine_codec  # noqa: E402
from seqkv.store import Store  # noqa: E402
from seqkv.store import store as store_module  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--texts")
    ap.add_argument("--sessions", type=int, default=256)
    a = ap.parse_args()
    lm = load_model(a.model, device="cuda")
    lm.engine().compile()
    sessions = chunks(lm.tokenizer, load_texts(a.texts)[:-1], a.sessions, 256)
    group_cls = engine_codec._DecodeGroup
    for name in ("__init__", "_load", "_side_step", "_warm_up", "run"):
        setattr(group_cls, name, synced(f"group.{name}", getattr(group_cls, name)))
    capture = synced("group.capture", group_cls._graph)
    group_cls._graph = lambda self, span: (capture(self, span) if span not in self.graphs
                                           else self.graphs[span])
    own_decode = engine_codec.EngineCodec.decode_intervals

    def decode_intervals(self, words, lengths, contexts=None, *args, **kwargs):
        print(f"   decode: {len(words)} streams, {max(lengths)} steps, contexts up to "
              f"{max((len(c) for c in contexts or [[]]), default=0)}, capacity "
              f"{kwargs.get('capacity')}, kept {list(self._pool.free)}")
        return own_decode(self, words, lengths, contexts, *args, **kwargs)

    engine_codec.EngineCodec.decode_intervals = synced("codec.decode_intervals",
                                                       decode_intervals)
    store_module.decode_edges = synced("store.decode_edges", store_module.decode_edges)
    for name in ("refresh", "_decode_paths", "_ids_below", "get_many"):
        setattr(Store, name, synced(f"store.{name}", getattr(Store, name)))
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "store.db")
        compaction(db, lm, sessions, "cuda")
        names = [f"s{i}" for i in range(len(sessions))]
        for rep in range(3):
            spent.clear()
            calls.clear()
            fresh = Store(db, lm)
            torch.cuda.synchronize()
            t = time.perf_counter()
            assert fresh.get_many(names) == sessions
            seconds = time.perf_counter() - t
            print(f"== get_many rep {rep}: {seconds:.3f} s, "
                  f"{sum(map(len, sessions)) / seconds:,.0f} tok/s")
            for name, s in sorted(spent.items(), key=lambda kv: -kv[1]):
                print(f"   {name:26s} {s * 1e3:8.1f} ms  x{calls[name]}")


if __name__ == "__main__":
    main()
