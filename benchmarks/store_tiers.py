"""Tiers chosen by the prior: stored bytes against mean restore time, prior-guided vs LRU,
each node's tier (KV checkpoint quantized with seqkv.quant, raw token ids, or coded tokens)
chosen under one byte budget, on one Zipf restore trace.

    python benchmarks/store_tiers.py [--quant turboquant-mse:4|int8|fp8] [--restores 400]
        [--out benchmarks/results/store_tiers_cpu.json]   (also writes the .png beside it)

The store: 12 SmolLM2 sessions (Brown news): one 32-token system prompt shared by all, three
24-token documents each shared by four sessions, and 12 tokens of each session's own (small,
so that coding and one measured decode take minutes on the 2-core CPU); put and compacted
(coded under the integer engine). Per-tier unit costs are measured here, once: decoding a
coded edge (the store's own read path on a fresh store, per token), reading a raw edge (the
same on a fresh store of the uncompacted sessions, per token), a prefill (fitted as one call
plus a cost per token, from prefills of 8 and 68 tokens: a restore makes one model call), and
loading a quantized checkpoint (deserialize + dequantize, per token, from a real checkpoint
record, whose size per token is measured too). The curve is then modelled from those costs
(measuring 400 restores per point for 56 points would take hours):

    restore time = load x held + decode x (coded tokens below the checkpoint)
                   + read x (raw tokens below it) + prefill x (depth - held) + call

for a session of ``depth`` tokens whose deepest checkpoint covers ``held`` tokens (0 without
one; a checkpoint holds its path's ids, so nothing above it is read). Stored bytes, at the end
of the trace: coded edges at their coded bits as stored, raw edges at 4 bytes a token (the
store's raw-edge bytes), checkpoints at the measured quantized record size. Both policies see
the same trace and re-select after every restore (``Policy.tiers``: LRU by recency, the
prior-guided policy with the unit costs measured here), under budgets from 0 to every edge
raw plus every candidate checkpoint; the checkpoint-only policies of before (every edge coded,
``Policy.select``) run on the same trace for comparison. Reference points: every edge coded,
no checkpoint; every edge raw, no checkpoint. Last, the prior-guided choice at two budgets is
applied to the real store (``Store.rebalance``), compacted and read back in a fresh store:
its kept bytes, and every session's restore measured against the model of it.
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
from seqkv.store.policies import LRUPolicy, PriorGuidedPolicy, Tier  # noqa: E402
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
    raw = Store(db, lm, "raw-probe")  # the sessions uncompacted: every edge raw
    for k, v in sessions.items():
        raw.put(k, v)
    fresh_raw = Store(db, lm, "raw-probe")
    fresh_raw.get_ids(name, use_checkpoint=False)  # warm-up
    fresh_raw = Store(db, lm, "raw-probe")
    t0 = time.perf_counter()
    for _ in range(10):
        fresh_raw._gen = -1  # re-read the records, as a fresh process would
        fresh_raw.get_ids(name, use_checkpoint=False)
    read_s = (time.perf_counter() - t0) / 10 / len(sessions[name])
    ids = sessions[name]
    prefill_cache(lm.model, ids[:32])  # warm-up

    def timed(n: int, reps: int) -> float:
        best = []
        for _ in range(reps):
            t0 = time.perf_counter()
            prefill_cache(lm.model, ids[:n])
            best.append(time.perf_counter() - t0)
        return sorted(best)[reps // 2]

    # a + b x tokens: a restore makes one model call whatever it prefills
    short, long = timed(8, 7), timed(len(ids), 5)
    prefill_s = (long - short) / (len(ids) - 8)
    call_s = max(short - 8 * prefill_s, 0.0)
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
    return {"decode_s_per_token": decode_s, "raw_read_s_per_token": read_s,
            "prefill_s_per_token": prefill_s, "prefill_call_s": call_s,
            "ckpt_load_s_per_token": load_s, "ckpt_bytes_per_token": nbytes / held,
            "ckpt_estimate_bytes_per_token": s.checkpoint_size(len(ids)) / held,
            "decoded_tokens": fresh.decoded_tokens}


def restore_time(path: list, tiers: dict[str, Tier], c: dict) -> float:
    """Modelled restore of the session ending at path[-1] under ``tiers``."""
    deepest = max((k for k, e in enumerate(path) if tiers.get(e.id) is Tier.CHECKPOINT),
                  default=-1)
    depth = path[-1].depth
    held = path[deepest].depth - path[deepest].depth % ALIGN if deepest >= 0 else 0
    below = path[deepest + 1 :]
    raw = sum(e.n for e in below if tiers.get(e.id) is Tier.RAW)
    coded = sum(e.n for e in below) - raw
    return (c["ckpt_load_s_per_token"] * held + c["decode_s_per_token"] * coded
            + c["raw_read_s_per_token"] * raw + c["prefill_s_per_token"] * (depth - held)
            + c["prefill_call_s"])


def stored_bytes(store: Store, nodes: dict, tiers: dict[str, Tier], c: dict) -> dict:
    """Bytes at these tiers: coded edges as stored, raw at 4 a token, checkpoints measured."""
    per_token = c["ckpt_bytes_per_token"] / c["ckpt_estimate_bytes_per_token"]
    edges = list(store.trie.edges())
    raw = sum(4 * e.n for e in edges if tiers.get(e.id) is Tier.RAW)
    coded = sum(e.bits for e in edges if tiers.get(e.id) is not Tier.RAW) / 8
    ckpt = per_token * sum(nodes[i].bytes for i, t in tiers.items() if t is Tier.CHECKPOINT)
    return {"coded_bytes": coded, "raw_bytes": raw, "checkpoint_bytes": ckpt,
            "stored_bytes": coded + raw + ckpt}


def replay(store: Store, policy, budget: int, trace: list[str], costs: dict,
           three_tiers: bool = True) -> dict:
    """One policy over the trace: restore under the tiers of the moment, then re-select."""
    nodes = store.candidates()
    for n in nodes.values():
        n.hits, n.last = 0, 0.0
    tiers: dict[str, Tier] = {}
    total, occupied = 0.0, 0.0
    for clock, name in enumerate(trace, 1):
        node = store.trie.sessions[name]
        path = store.trie.path(node)
        total += restore_time(path, tiers, costs)
        for e in path:
            nodes[e.id].hits += 1
            nodes[e.id].last = clock
        if three_tiers:
            tiers = policy.tiers(nodes, tiers, node.id, budget)
        else:  # the checkpoint-only API: every edge coded
            kept = {i for i, t in tiers.items() if t is Tier.CHECKPOINT}
            tiers = {i: Tier.CHECKPOINT for i in policy.select(nodes, kept, node.id, budget)}
        occupied += stored_bytes(store, nodes, tiers, costs)["stored_bytes"]
    end = stored_bytes(store, nodes, tiers, costs)
    name = policy.name if three_tiers else f"{policy.name}-checkpoints-only"
    return {"policy": name, "budget_bytes": budget,
            "checkpoints": sum(t is Tier.CHECKPOINT for t in tiers.values()),
            "raw_edges": sum(t is Tier.RAW for t in tiers.values()), **end,
            "mean_stored_bytes": occupied / len(trace), "mean_restore_s": total / len(trace),
            "_tiers": tiers, "_nodes": nodes}


def check_store(db: str, lm, quant, prior, budget: int, trace: list[str], sessions: dict,
                costs: dict) -> dict:
    """The prior-guided choice at ``budget`` applied to the real store (the hits of the whole
    trace, one rebalance), compacted, every session read back in a fresh store, and each
    session's restore measured in a fresh store against the model of it."""
    s = Store(db, lm, checkpoint_budget=budget, checkpoint_policy=prior, checkpoint_quant=quant)
    s.refresh()
    s.checkpoints.forget_hits()  # the store keeps counted restores: this check's trace alone
    for name in trace:
        s.checkpoints.touch(name)
    t0 = time.perf_counter()
    out = s.rebalance()
    rebalance_s = time.perf_counter() - t0
    r = s.compact()
    st = s.stats()
    fresh = Store(db, lm, checkpoint_quant=quant)
    exact = all(fresh.get_ids(k, use_checkpoint=False) == v for k, v in sessions.items())
    measured, modelled, restored_exact, decoded = {}, {}, True, 0
    for name in sorted(sessions):  # each restore in a fresh store (nothing decoded before)
        fresh = Store(db, lm, checkpoint_quant=quant)
        fresh.refresh()
        t0 = time.perf_counter()
        restored = fresh.get_cache(name)
        measured[name] = time.perf_counter() - t0
        restored_exact &= restored.input_ids[0].tolist() == sessions[name]
        decoded += fresh.last_restore["decoded_tokens"]
        modelled[name] = restore_time(fresh.trie.path(fresh.trie.sessions[name]),
                                      fresh.tiers(), costs)
    return {"budget_bytes": budget, "policy_bytes": out["policy_bytes"],
            "checkpoints": st["checkpoints"], "checkpoint_record_bytes": st["checkpoint_bytes"],
            "raw_kept_edges": st["raw_kept_edges"], "raw_kept_bytes": st["raw_kept_bytes"],
            "coded_bytes": st["bits_total"] / 8, "raw_swapped": out["raw_swapped"],
            "rebalance_s": rebalance_s, "compaction_kept_raw": r.kept_raw,
            "compaction_pending": r.pending, "all_sessions_exact": exact,
            "restored_ids_exact": restored_exact, "restore_decoded_tokens": decoded,
            "trace_mean_restore_measured_s": sum(measured[n] for n in trace) / len(trace),
            "trace_mean_restore_modelled_s": sum(modelled[n] for n in trace) / len(trace),
            "restore_measured_s": measured, "restore_modelled_s": modelled}


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
        raw_all = 4 * st["tokens_unique"]
        ckpt_all = sum(n.bytes for n in cands.values())
        # the raw tier is ~10^3x smaller than the checkpoints: budgets in both ranges
        budgets = sorted({0, *(raw_all * f // 4 for f in (1, 2, 3, 4)),
                          *(raw_all + ckpt_all * f // (a.budgets - 1)
                            for f in range(1, a.budgets))})
        lru = LRUPolicy()
        prior = PriorGuidedPolicy(decode_cost=costs["decode_s_per_token"],
                                  prefill_cost=costs["prefill_s_per_token"],
                                  load_cost=costs["ckpt_load_s_per_token"])
        rows = []
        for budget in budgets:
            for policy, three in ((lru, True), (prior, True), (lru, False), (prior, False)):
                row = replay(s, policy, budget, trace, costs, three)
                row.pop("_nodes"), row.pop("_tiers")
                rows.append(row)
                print(json.dumps(row), flush=True)
        depth = {k: len(v) for k, v in sessions.items()}
        mean_depth = sum(depth[n] for n in trace) / len(trace)
        out["reference"] = {
            "all_coded_no_checkpoint": {
                "stored_bytes": coded,
                "mean_restore_s": (costs["decode_s_per_token"] + costs["prefill_s_per_token"])
                * mean_depth + costs["prefill_call_s"]},
            "all_raw_no_checkpoint": {
                "stored_bytes": raw_all,
                "mean_restore_s": (costs["raw_read_s_per_token"] + costs["prefill_s_per_token"])
                * mean_depth + costs["prefill_call_s"]},
        }
        out.update(stats=st, candidates=len(cands), raw_all_bytes=raw_all,
                   checkpoint_candidate_bytes=ckpt_all, rows=rows)
        out["store_check"] = []
        for budget in (raw_all // 2, raw_all + ckpt_all // 4):  # raw edges only; and both
            out["store_check"].append(check_store(db, lm, quant, prior, budget, trace,
                                                  sessions, costs))
            print(json.dumps(out["store_check"][-1]), flush=True)
        out["loadavg_after"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    plot(out, Path(a.out).with_suffix(".png"))


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.8))
    styles = {"lru": ("o--", "tab:blue", "LRU, three tiers"),
              "prior": ("s-", "tab:red", "prior-guided, three tiers"),
              "lru-checkpoints-only": ("o:", "lightsteelblue", "LRU, checkpoints only"),
              "prior-checkpoints-only": ("s:", "lightsalmon", "prior-guided, checkpoints only")}
    for name, (style, color, label) in styles.items():
        pts = sorted((r["stored_bytes"], r["mean_restore_s"])
                     for r in out["rows"] if r["policy"] == name)
        ax.plot(*zip(*pts, strict=True), style, color=color, ms=4, label=label)
    for label, ref in out["reference"].items():
        ax.plot(ref["stored_bytes"], ref["mean_restore_s"], "k^")
        ax.annotate(label.replace("_", " "), (ref["stored_bytes"], ref["mean_restore_s"]),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"stored bytes: coded edges + raw edges + KV checkpoints ({out['quant']})")
    ax.set_ylabel("mean restore time (s, modelled from measured unit costs)")
    ax.set_title(f"PLT tiers, Zipf({out['zipf']}) trace of {out['restores']} restores, "
                 "2-core CPU", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
