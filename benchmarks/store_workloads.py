"""PLT store on real-text workloads: bytes stored vs fp16 KV, 3-bit TurboQuant KV and vLLM-style
prefix caching (16-token block hashes, fp16 KV per unique block) on the same trace; restore
time; prior-guided vs LRU checkpoints (restore compute saved per byte) on a restore trace.

    python benchmarks/store_workloads.py [--scale 1] [--device cpu]
        [--out benchmarks/results/store_workloads.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from corpora import brown, python_docs  # noqa: E402

from seqkv.core.cache import prefill_cache  # noqa: E402
from seqkv.core.kvsize import fp16_kv_bits, turboquant_kv_bits  # noqa: E402
from seqkv.core.models import load_model  # noqa: E402
from seqkv.store import Store  # noqa: E402
from seqkv.store.policies import LRUPolicy, PriorGuidedPolicy, restore_cost  # noqa: E402


def head(tok, text: str, n: int) -> list[int]:
    return tok(text).input_ids[:n]


def workloads(tok, scale: int) -> dict[str, list[tuple[str, list[int]]]]:
    news, fiction = brown("a", 4), brown("k", 2)
    docs = python_docs(6)
    # multi-turn chat: each turn resends the whole history plus a new user+assistant turn
    turns = [head(tok, t, 60 * scale) for t in news[:4]]
    chat, hist = [], []
    for i, t in enumerate(turns):
        hist = hist + t
        chat.append((f"chat-turn{i}", list(hist)))
    # many sessions sharing a system prompt and one document, each with its own question
    system = head(tok, docs[0], 150 * scale)
    doc = head(tok, docs[1], 150 * scale)
    shared = [(f"rag-{i}", system + doc + head(tok, docs[2 + i % 4][200 * i:], 30 * scale))
              for i in range(6)]
    unrelated = [(f"text-{i}", head(tok, t, 120 * scale)) for i, t in enumerate(fiction + news[2:])]
    return {"multi-turn chat": chat, "shared prompt + document": shared,
            "unrelated texts": unrelated}


def vllm_prefix_bits(config, sessions: list[list[int]], block: int = 16) -> int:
    """vLLM automatic prefix caching: a block of 16 tokens is keyed by the hash of all tokens up
    to its end; full blocks are shared across sessions, the last partial block is not."""
    seen, tokens = set(), 0
    for i, ids in enumerate(sessions):
        for b in range(0, len(ids), block):
            end = min(b + block, len(ids))
            key = hashlib.sha256(repr(ids[:end]).encode()).hexdigest()
            key = key if end - b == block else f"{key}/{i}"
            if key not in seen:
                seen.add(key)
                tokens += end - b
    return fp16_kv_bits(config, 1) * tokens


def run(lm, name: str, sessions, tmp: Path) -> dict:
    db = str(tmp / f"{name.replace(' ', '_')}.db")
    t0 = time.perf_counter()
    s = Store(db, lm, chunk=512)
    for sid, ids in sessions:
        s.put(sid, ids)
    put_s = time.perf_counter() - t0  # durable, raw
    t0 = time.perf_counter()
    s.compact()  # coded under the model
    compact_s = time.perf_counter() - t0
    st = s.stats()
    assert st["raw_edges"] == 0
    fresh = Store(db, lm)  # restore in a new store: every edge decoded from its bits
    t0 = time.perf_counter()
    for sid, ids in sessions:
        assert fresh.get_ids(sid) == ids
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _, ids in sessions:
        prefill_cache(lm.model, ids)
    prefill_s = time.perf_counter() - t0
    cfg = lm.config
    stored_bits = st["bits_total"]
    row = {
        "workload": name, "sessions": st["sessions"], "tokens_total": st["tokens_total"],
        "tokens_unique": st["tokens_unique"], "plt_bytes": stored_bits / 8,
        "plt_bits_per_unique_token": st["bits_per_unique_token"],
        "fp16_kv_bytes": fp16_kv_bits(cfg, 1) * st["tokens_total"] / 8,
        "turboquant3_kv_bytes": turboquant_kv_bits(cfg, 1, 3) * st["tokens_total"] / 8,
        "vllm_prefix_fp16_bytes": vllm_prefix_bits(cfg, [ids for _, ids in sessions]) / 8,
        "put_s": put_s, "compact_s": compact_s, "restore_decode_s": decode_s,
        "restore_prefill_s": prefill_s,
    }
    for k in ("fp16_kv_bytes", "turboquant3_kv_bytes", "vllm_prefix_fp16_bytes"):
        row["ratio_vs_" + k.removesuffix("_bytes")] = row[k] / row["plt_bytes"]
    row["_store"] = s
    return row


def policy_trace(store: Store, step_s: float, prefill_s: float, budgets, seed=0) -> list[dict]:
    """Replay one Zipf restore trace against each policy; compute saved per checkpoint byte."""
    names = sorted(store.trie.sessions)
    rng = random.Random(seed)
    weights = [1 / (r + 1) ** 1.1 for r in range(len(names))]
    rng.shuffle(weights)
    trace = rng.choices(names, weights, k=200)
    store.refresh()
    out = []
    for budget in budgets:
        for policy in (LRUPolicy(), PriorGuidedPolicy()):
            nodes = store.candidates()
            for n in nodes.values():
                n.hits, n.last = 0, 0.0
            kept: set[str] = set()
            saved = 0.0
            for clock, name in enumerate(trace, 1):
                node = store.trie.sessions[name]
                path_ids = {p.id for p in store.trie.path(node)}
                ck = max((nodes[i].depth - nodes[i].depth % 16 for i in kept if i in path_ids),
                         default=0)
                saved += (restore_cost(node.depth, 0, store.chunk, step_s, prefill_s)
                          - restore_cost(node.depth, ck, store.chunk, step_s, prefill_s))
                for i in path_ids & set(nodes):
                    nodes[i].hits += 1
                    nodes[i].last = clock
                acc = node.id if node.id in nodes else None
                kept = policy.select(nodes, kept, acc, budget)
            used = sum(nodes[i].bytes for i in kept)
            out.append({"policy": policy.name, "budget_bytes": budget, "saved_s": saved,
                        "saved_s_per_MB_budget": saved / (budget / 1e6), "kept": len(kept),
                        "kept_bytes": used, "restores": len(trace)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/store_workloads.json")
    a = ap.parse_args()
    lm = load_model(None, device=a.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, sessions in workloads(lm.tokenizer, a.scale).items():
            row = run(lm, name, sessions, Path(tmp))
            print({k: v for k, v in row.items() if k != "_store"}, flush=True)
            rows.append(row)
        # unit costs measured on this machine, from the runs above
        steps = sum(r["tokens_total"] for r in rows)
        step_s = sum(r["restore_decode_s"] for r in rows) / max(steps, 1)
        prefill_s = sum(r["restore_prefill_s"] for r in rows) / max(steps, 1)
        shared = next(r for r in rows if r["workload"].startswith("shared"))["_store"]
        per_tok = shared.checkpoint_size(16) / 16
        budgets = [int(per_tok * t) for t in (256, 512, 1024)]
        policies = policy_trace(shared, step_s, prefill_s, budgets)
        for p in policies:
            print(p, flush=True)
    for r in rows:
        r.pop("_store")
    Path(a.out).write_text(json.dumps({"workloads": rows, "policies": policies,
                                       "step_s": step_s, "prefill_s_per_token": prefill_s},
                                      indent=2))


if __name__ == "__main__":
    main()
