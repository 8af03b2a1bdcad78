"""Tiers chosen by the prior: stored bytes against mean restore time, prior-guided vs LRU
KV checkpoints (quantized with seqkv.quant) on one Zipf restore trace.

    python benchmarks/store_tiers.py [--quant turboquant-mse:4|int8|fp8] [--restores 400]
        [--out benchmarks/results/store_tiers_cpu.json]   (also writes the .png beside it)

The store: 12 SmolLM2 sessions (Brown news): one 32-token system prompt shared by all, three
24-token documents each shared by four sessions, and 12 tokens of each session's own (small,
so that coding and one measured decode take minutes on the 2-core CPU); put and compacted
(coded under the integer engine). Per-tier unit costs are measured here, once:
decoding a coded edge (the store's own read path on a fresh store, per token), a prefill
(per token), and loading a quantized checkpoint (deserialize + dequantize, per token, from a
real checkpoint record, whose size per token is measured too). The curve is then modelled
from those costs (measuring 400 restores per point on this CPU would take hours):

    restore time = load x held + (decode + prefill) x (depth - held)

for a session of ``depth`` tokens whose deepest kept checkpoint covers ``held`` tokens (0
without one). Stored bytes = the coded edges + the checkpoints kept at the end of the trace.
Both policies see the same trace and re-select after every restore (``Policy.select``),
under budgets from 0 to every candidate; reference points: every edge coded with no
checkpoint, and every edge raw (4 bytes a token, no decode) with no checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from corpora import brown  # noqa: E402

from seqkv.core.models import load_model  # noqa: E402
from seqkv.store import Store  # noqa: E402
from seqkv.store.checkpoints import ALIGN, deserialize_kv  # noqa: E402
from seqkv.store.policies import LRUPolicy, PriorGuidedPolicy  # noqa: E402
from seqkv.store.records import parse  # noqa: E402
from seqkv.tokens.api import prefill_cache  # noqa: E402


def workload(tok, n: int = 12, prompt_n: int = 32, doc_n: int = 24, own_n: int = 12,
             docs_n: int = 3) -> dict[str, list[int]]:
    texts = brown("a", 30)
    ids = [tok(t).input_ids for t in texts]
    prompt = ids[0][:prompt_n]
    docs = [ids[1 + d][:doc_n] for d in range(docs_n)]
    return {f"s{i:02d}": prompt + docs[i % docs_n] + ids[5 + i][:own_n] for i in range(n)}


def measure_costs(db: str, lm, sessions: dict, quant: tuple[str, float | None]) -> dict:
    """Unit costs on this machine: decode / prefill / checkpoint load, seconds per token."""
    name = "s00"
    fresh = Store(db, lm)
    t0 = time.perf_counter()
    fresh.get_ids(name, use_checkpoint=False)  # every edge of its path decoded, fresh
    decode_s = (time.perf_counter() - t0) / fresh.decoded_tokens
    ids = sessions[name]
    prefill_cache(lm.model, ids[:32])  # warm-up
    t0 = time.perf_counter()
    prefill_cache(lm.model, ids)
    prefill_s = (time.perf_counter() - t0) / len(ids)
    s = Store(db, lm, "ckpt-probe", checkpoint_budget=10**12, checkpoint_quant=quant)
    s.put(name, ids)
    nbytes = s.checkpoint(name)
    held = len(ids) - len(ids) % ALIGN
    raw = s.backend.read(s.ns, "ckpt", s.trie.sessions[name].id)
    header, sections = parse("ckpt", "probe", raw)
    dtype = next(lm.model.parameters()).dtype
    deserialize_kv(header["kv"], sections[1], lm.config, dtype, lm.device)  # warm-up
    t0 = time.perf_counter()
    for _ in range(3):
        deserialize_kv(header["kv"], sections[1], lm.config, dtype, lm.device)
    load_s = (time.perf_counter() - t0) / 3 / held
    return {"decode_s_per_token": decode_s, "prefill_s_per_token": prefill_s,
            "ckpt_load_s_per_token": load_s, "ckpt_bytes_per_token": nbytes / held,
            "ckpt_estimate_bytes_per_token": s.checkpoint_size(len(ids)) / held,
            "decoded_tokens": fresh.decoded_tokens}


def restore_time(depth: int, held: int, c: dict) -> float:
    return (c["ckpt_load_s_per_token"] * held
            + (c["decode_s_per_token"] + c["prefill_s_per_token"]) * (depth - held))


def replay(store: Store, policy, budget: int, trace: list[str], costs: dict) -> dict:
    nodes = store.candidates()
    for n in nodes.values():
        n.hits, n.last = 0, 0.0
    kept: set[str] = set()
    total = 0.0
    per_token = costs["ckpt_bytes_per_token"] / costs["ckpt_estimate_bytes_per_token"]
    for clock, name in enumerate(trace, 1):
        node = store.trie.sessions[name]
        path = {p.id for p in store.trie.path(node)}
        held = max((nodes[i].depth - nodes[i].depth % ALIGN for i in kept if i in path),
                   default=0)
        total += restore_time(node.depth, held, costs)
        for i in path & set(nodes):
            nodes[i].hits += 1
            nodes[i].last = clock
        kept = policy.select(nodes, kept, node.id if node.id in nodes else None, budget)
    ckpt_bytes = per_token * sum(nodes[i].bytes for i in kept)  # measured size, not estimate
    return {"policy": policy.name, "budget_bytes": budget, "checkpoints": len(kept),
            "checkpoint_bytes": ckpt_bytes, "mean_restore_s": total / len(trace)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="turboquant-mse:4", help="METHOD[:BITS]")
    ap.add_argument("--restores", type=int, default=400)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--budgets", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/store_tiers_cpu.json")
    a = ap.parse_args()
    method, _, bits = a.quant.partition(":")
    quant = (method, float(bits) if bits else 8.0)
    lm = load_model()
    sessions = workload(lm.tokenizer)
    out = {"machine": platform.machine(), "cpus": os.cpu_count(), "quant": a.quant,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "loadavg_before": os.getloadavg(), "restores": a.restores, "zipf": a.zipf}
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "tiers.db")
        s = Store(db, lm, checkpoint_quant=quant)
        for k, v in sessions.items():
            s.put(k, v)
        t0 = time.perf_counter()
        r = s.compact()
        out["compaction"] = {"edges": r.edges, "tokens": r.tokens,
                             "seconds": time.perf_counter() - t0, "coded_bits": r.coded_bits}
        costs = measure_costs(db, lm, sessions, quant)
        out["costs"] = costs
        print(json.dumps(out), flush=True)
        st = s.stats()
        coded = st["bits_total"] / 8
        rng = random.Random(a.seed)
        names = sorted(sessions)
        weights = [1 / (r + 1) ** a.zipf for r in range(len(names))]
        rng.shuffle(weights)
        trace = rng.choices(names, weights, k=a.restores)
        cands = s.candidates()
        everything = sum(n.bytes for n in cands.values())
        budgets = [int(everything * f / (a.budgets - 1)) for f in range(a.budgets)]
        rows = []
        for budget in budgets:
            for policy in (LRUPolicy(), PriorGuidedPolicy()):
                row = replay(s, policy, budget, trace, costs)
                row["stored_bytes"] = coded + row["checkpoint_bytes"]
                rows.append(row)
                print(json.dumps(row), flush=True)
        depth = {k: len(v) for k, v in sessions.items()}
        mean_depth = sum(depth[n] for n in trace) / len(trace)
        out["reference"] = {
            "all_coded_no_checkpoint": {"stored_bytes": coded,
                                        "mean_restore_s": restore_time(mean_depth, 0, costs)},
            "all_raw_no_checkpoint": {"stored_bytes": 4 * st["tokens_unique"],
                                      "mean_restore_s": costs["prefill_s_per_token"] * mean_depth},
        }
        out.update(stats=st, candidates=len(cands), candidate_bytes=everything, rows=rows,
                   loadavg_after=os.getloadavg())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    plot(out, Path(a.out).with_suffix(".png"))


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, style in (("lru", "o--"), ("prior", "s-")):
        pts = sorted((r["stored_bytes"] / 1e6, r["mean_restore_s"])
                     for r in out["rows"] if r["policy"] == name)
        ax.plot(*zip(*pts, strict=True), style, label=f"{name} checkpoints ({out['quant']})")
    for label, ref in out["reference"].items():
        ax.plot(ref["stored_bytes"] / 1e6, ref["mean_restore_s"], "k^")
        ax.annotate(label.replace("_", " "), (ref["stored_bytes"] / 1e6, ref["mean_restore_s"]),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("stored bytes (MB): coded edges + KV checkpoints")
    ax.set_ylabel("mean restore time (s, modelled from measured unit costs)")
    ax.set_title(f"PLT tiers, Zipf({out['zipf']}) trace of {out['restores']} restores, CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
