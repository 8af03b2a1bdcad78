"""The PLT store on a GPU (or the CPU at tiny sizes): compaction speed, restore latency of one
coded chat, restore throughput of many sessions at once, and coded bytes against P_M.

    python benchmarks/store_gpu.py --device cuda [--model PATH] [--texts brown_a.json]
        [--sessions 1024] [--tokens 256] [--restore-sessions 256] [--chat-tokens 600]
        [--repeats 5] --out benchmarks/results/store_gpu_h200.json
    python benchmarks/store_gpu.py --device cpu --sessions 4 --tokens 32 --chat-tokens 80 \\
        --repeats 2 --out /tmp/store_gpu_cpu.json                          (a smoke test)

Texts: ``--texts`` a JSON list of strings (for a machine without network; write one here with
``--dump-texts brown_a.json``), else the Brown news category (benchmarks/corpora.py).

1. Compaction: ``--sessions`` sessions of ``--tokens`` tokens (distinct Brown chunks) put raw
   (timed: the write path), then coded by one ``Store.compact`` (all edges in one batch):
   tokens/s (goal >= 100,000 on the H200). Then the coded bytes against the information:
   sum over edges of -log2 P_M (the engine's fixed-point probabilities the coder used) +
   one flush per edge (the rANS coder's final 64-bit state), goal coded <= 1.02 x info +
   flush.
2. One client: a 4-turn chat (each turn resends the history; ``--chat-tokens`` at the last
   turn) put and compacted; then, ``--repeats`` times after one cold restore (reported
   apart), a fresh Store (nothing decoded in memory) restores the last turn: ids (decode)
   and KV cache (decode + prefill); p50 (goal <= 0.75 s on the H200).
3. Many clients: the first ``--restore-sessions`` sessions of (1) restored together by a
   fresh Store's ``get_many`` (lockstep decode rounds, shared prefixes first), after one
   cold restore (reported apart): tokens/s (goal >= 50,000 over 256 sessions on the H200).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from seqkv.core.models import load_model  # noqa: E402
from seqkv.store import Store  # noqa: E402
from seqkv.store.trie import info_bits  # noqa: E402

FLUSH_BITS = 64  # constriction's AnsCoder flushes its 64-bit state: two 32-bit words


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def load_texts(path: str | None) -> list[str]:
    if path:
        return json.loads(Path(path).read_text())
    from corpora import brown

    return brown("a", 44)


def chunks(tok, texts: list[str], n: int, tokens: int) -> list[list[int]]:
    """n distinct chunks of ``tokens`` ids cut from the texts at offsets a quarter chunk apart
    (so 44 Brown texts give ~1,600 chunks of 256): no two share a first token position, so
    they share no prefix beyond chance."""
    ids = [tok(t).input_ids for t in texts]
    out, stride = [], max(1, tokens // 4)
    for offset in range(0, max(len(t) for t in ids), stride):
        for t in ids:
            if offset + tokens <= len(t):
                out.append(t[offset : offset + tokens])
                if len(out) == n:
                    return out
    raise SystemExit(f"not enough text for {n} chunks of {tokens} tokens (got {len(out)})")


def compaction(db: str, lm, sessions: list[list[int]], device: str) -> dict:
    s = Store(db, lm)
    t0 = time.perf_counter()
    for i, ids in enumerate(sessions):
        s.put(f"s{i}", ids)
    put_s = time.perf_counter() - t0
    sync(device)
    t0 = time.perf_counter()
    r = s.compact(batch=len(sessions) + 1)
    sync(device)
    seconds = time.perf_counter() - t0
    edges = [n for n in s.trie.edges()]
    info = float(sum(info_bits(n.intervals).sum() for n in edges))
    coded = int(sum(n.bits for n in edges))
    over = [n.bits - float(info_bits(n.intervals).sum()) for n in edges]
    return {"sessions": len(sessions), "tokens": r.tokens, "edges": r.edges,
            "put_s": put_s, "puts_per_s": len(sessions) / put_s,
            "compact_s": seconds, "compact_tokens_per_s": r.tokens / seconds,
            "coded_bits": coded, "info_bits": info, "flush_bits_per_edge": FLUSH_BITS,
            "bound_bits": 1.02 * info + FLUSH_BITS * len(edges),
            "within_bound": coded <= 1.02 * info + FLUSH_BITS * len(edges),
            "coded_over_info": coded / info,
            "coded_minus_flushes_over_info": (coded - FLUSH_BITS * len(edges)) / info,
            "overhead_bits_per_edge": {"min": min(over), "mean": statistics.mean(over),
                                       "max": max(over)}}


def chat_restore(db: str, lm, texts: list[str], chat_tokens: int, repeats: int,
                 device: str) -> dict:
    ids = lm.tokenizer(texts[-1]).input_ids  # the text the sessions of (1) do not use
    turns = [ids[: chat_tokens * (i + 1) // 4] for i in range(4)]  # the history, resent
    s = Store(db, lm, "chat")
    for i, ids in enumerate(turns):
        s.put(f"turn{i + 1}", ids)
    t0 = time.perf_counter()
    r = s.compact()
    compact_s = time.perf_counter() - t0
    ids_s, cache_s = [], []
    for _ in range(repeats + 1):  # the first, cold (graph capture, new shapes), not counted
        fresh = Store(db, lm, "chat")
        sync(device)
        t0 = time.perf_counter()
        assert fresh.get_ids("turn4") == turns[3]
        sync(device)
        ids_s.append(time.perf_counter() - t0)
        fresh = Store(db, lm, "chat")
        t0 = time.perf_counter()
        restored = fresh.get_cache("turn4")
        sync(device)
        cache_s.append(time.perf_counter() - t0)
        assert restored.input_ids[0].tolist() == turns[3]
    st = s.stats()
    return {"turn_tokens": [len(t) for t in turns], "tokens_unique": st["tokens_unique"],
            "edges": st["edges"], "coded_bytes": st["bits_total"] // 8,
            "compact_s": compact_s, "compact_tokens": r.tokens,
            "restore_ids_first_s": ids_s[0], "restore_cache_first_s": cache_s[0],
            "restore_ids_s": ids_s[1:], "restore_ids_p50_s": statistics.median(ids_s[1:]),
            "restore_cache_s": cache_s[1:],
            "restore_cache_p50_s": statistics.median(cache_s[1:])}


def many_restore(db: str, lm, sessions: list[list[int]], k: int, repeats: int,
                 device: str) -> dict:
    names = [f"s{i}" for i in range(min(k, len(sessions)))]
    times = []
    for _ in range(repeats + 1):  # the first, cold (graph capture, new shapes), not counted
        fresh = Store(db, lm)
        sync(device)
        t0 = time.perf_counter()
        out = fresh.get_many(names)
        sync(device)
        times.append(time.perf_counter() - t0)
        assert out == sessions[: len(names)]
    tokens = sum(len(x) for x in sessions[: len(names)])
    p50 = statistics.median(times[1:])
    return {"sessions": len(names), "tokens": tokens, "first_s": times[0],
            "seconds": times[1:], "p50_s": p50, "tokens_per_s": tokens / p50}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default=None)
    ap.add_argument("--texts", default=None, help="JSON list of texts (default: Brown news)")
    ap.add_argument("--dump-texts", default=None, help="write the Brown texts here and exit")
    ap.add_argument("--sessions", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--restore-sessions", type=int, default=256)
    ap.add_argument("--chat-tokens", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true",
                    help="lm.engine().compile() first, and warm up on a throwaway compaction")
    ap.add_argument("--out", default="benchmarks/results/store_gpu.json")
    a = ap.parse_args()
    if a.dump_texts:
        Path(a.dump_texts).write_text(json.dumps(load_texts(None)))
        return
    texts = load_texts(a.texts)
    lm = load_model(a.model, device=a.device)
    if a.compile:
        lm.engine().compile()
    out = {"device": a.device, "machine": platform.machine(), "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(a),
           "loadavg_before": os.getloadavg()}
    if a.device.startswith("cuda"):
        import torch

        out["gpu"] = torch.cuda.get_device_name()
    sessions = chunks(lm.tokenizer, texts[:-1], a.sessions, a.tokens)
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)

    def record(key: str, value: dict) -> None:  # kept after each part: a cut-off run keeps some
        out[key] = value
        print(json.dumps({key: value}), flush=True)
        path.write_text(json.dumps(out, indent=2, default=float))

    if a.compile:  # a compiled engine compiles each new shape at first use: warm them up
        # (on the H200 the second compaction after start was still 5x slower than the third:
        # two throwaway ones, both timed here)
        warm = []
        for _ in range(2):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                compaction(str(Path(tmp) / "warm.db"), lm, sessions, a.device)
                warm.append(time.perf_counter() - t0)
        record("warm_up", {"compaction_s": warm})
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "store.db")
        record("compaction", compaction(db, lm, sessions, a.device))
        record("chat", chat_restore(db, lm, texts, a.chat_tokens, a.repeats, a.device))
        record("many", many_restore(db, lm, sessions, a.restore_sessions,
                                    max(1, a.repeats // 2), a.device))
    out["loadavg_after"] = os.getloadavg()
    out["goals"] = {
        "compaction_tokens_per_s >= 100000": out["compaction"]["compact_tokens_per_s"] >= 1e5,
        "chat restore p50 <= 0.75 s (ids)": out["chat"]["restore_ids_p50_s"] <= 0.75,
        "chat restore p50 <= 0.75 s (cache)": out["chat"]["restore_cache_p50_s"] <= 0.75,
        "many restore tokens_per_s >= 50000": out["many"]["tokens_per_s"] >= 5e4,
        "coded <= 1.02 info + flush per edge": out["compaction"]["within_bound"],
    }
    path.write_text(json.dumps(out, indent=2, default=float))
    print(json.dumps(out["goals"], indent=1))


if __name__ == "__main__":
    main()
