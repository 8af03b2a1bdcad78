"""Load test of `seqkv serve` (loopback only, bounded in time): K concurrent clients extend chat
sessions; then the server is killed with SIGKILL mid-load, again and again, and restarted.

    python benchmarks/store_loadtest.py [--clients 8] [--seconds 30] [--kills 50]
        [--db sqlite|redis://127.0.0.1:6379/14] [--model PATH] [--kill-model tiny|default|PATH]
        [--out benchmarks/results/store_loadtest_cpu.json]

Phase 1 (``--seconds``): each client keeps a chat session: every turn it PUTs the whole
history so far plus a new turn (Brown news text, SmolLM2 by default; the history is resent,
as chat clients do, and the store keeps the shared prefix once), then GETs it back and checks
it; every ``--turns`` turns it starts a new session. Background compaction is on. Reported:
puts/s and gets/s, p50/p99 of each, sessions, and bytes stored (coded streams + raw edges
pending, and the store file).

Phase 2 (``--kills`` rounds, on a fresh store): start the server, let the clients extend
sessions (token ids) for a random 0.3-1.2 s, SIGKILL the server (background compaction on, so
kills land in puts and in compactions alike), restart it and read every session back. A
session must hold exactly its last acknowledged put, or a put sent later whose answer the
kill cut off (committed, not acknowledged); anything else (an older version, a partial one,
a lost session) counts as a failure. ``--kill-model tiny`` (default) serves a tiny random
Llama with a small BPE tokenizer, so that 50 restarts take a few minutes: the write path,
compaction and recovery are the same code for any model. A restart is timed until the server
takes requests (its model loads in the background); each round starts once the compactor
process is ready too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from seqkv.client import Client, ServerError, start_server, stop_server, wait_healthy  # noqa: E402
from seqkv.testing import tiny_model_dir  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


class Server:
    """`seqkv serve` in a subprocess; ``startup_s``: from its start until it takes requests
    (``model_s``: until its model, loaded in the background, is ready; with ``wait_model``)."""

    def __init__(self, db: str, model: str | None, *extra: str, wait_model: bool = False,
                 wait_compactor: bool = False) -> None:
        t0 = time.perf_counter()
        self.proc, self.url = start_server(db, *extra,
                                           *(["--model", model] if model else []))
        self.startup_s = time.perf_counter() - t0
        self.model_s = self.compactor_s = None
        if wait_model:
            wait_healthy(self.url, 300, self.proc, model=True)
            self.model_s = time.perf_counter() - t0
        if wait_compactor:  # its own process: ready once it has loaded its model
            c = Client(self.url, timeout=10)
            while (state := c._json("GET", "/healthz")["compactor"]) != "running":
                if state == "exited" or time.perf_counter() - t0 > 300:
                    raise RuntimeError(f"the background compactor is {state}")
                time.sleep(0.05)
            self.compactor_s = time.perf_counter() - t0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc.stderr.close()

    def stop(self) -> None:
        stop_server(self.proc, timeout=60)


# -- phase 1: throughput and latency -------------------------------------------------------


def turns_of(texts: list[str], rng: random.Random, n: int) -> list[str]:
    """n chat turns: consecutive paragraphs (1-3) of one Brown text."""
    paras = [p for p in rng.choice(texts).split("\n\n") if p.strip()]
    out, i = [], rng.randrange(max(1, len(paras) - 3 * n))
    for _ in range(n):
        k = rng.randint(1, 3)
        out.append("\n\n".join(paras[i : i + k]) or "Hello.")
        i += k
    return out


def load_phase(url: str, clients: int, seconds: float, turns: int, seed: int) -> dict:
    from corpora import brown

    texts = brown("a", 44)
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    put_lat, get_lat, errors, sessions = [], [], [], set()

    def client(k: int) -> None:
        rng, c = random.Random(seed + k), Client(url)
        j = 0
        while time.monotonic() < stop:
            name, history = f"c{k}-chat{j}", ""
            for turn in turns_of(texts, rng, turns):
                if time.monotonic() >= stop:
                    break
                history = history + ("\n\n" if history else "") + turn
                try:
                    t = time.perf_counter()
                    c.put(name, text=history)
                    t1 = time.perf_counter()
                    back = c.get(name)["text"]
                    t2 = time.perf_counter()
                except ServerError as e:
                    with lock:
                        errors.append(str(e))
                    continue
                with lock:
                    put_lat.append(t1 - t)
                    get_lat.append(t2 - t1)
                    sessions.add(name)
                    if back != history:
                        errors.append(f"{name}: read back differs")
            j += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    st = Client(url).stats()
    return {"clients": clients, "seconds": wall, "puts": len(put_lat), "gets": len(get_lat),
            "puts_per_s": len(put_lat) / wall, "gets_per_s": len(get_lat) / wall,
            "put_p50_ms": 1e3 * statistics.median(put_lat), "put_p99_ms": 1e3 * pct(put_lat, .99),
            "get_p50_ms": 1e3 * statistics.median(get_lat), "get_p99_ms": 1e3 * pct(get_lat, .99),
            "errors": len(errors), "error_messages": errors[:5], "sessions": len(sessions),
            "tokens_total": st["tokens_total"], "tokens_unique": st["tokens_unique"],
            "coded_bytes": st["bits_total"] // 8, "raw_bytes_pending": st["raw_bytes"],
            "raw_edges_pending": st["raw_edges"]}


# -- phase 2: SIGKILL mid-load ---------------------------------------------------------------


class Ledger:
    """What each session must hold: its last acknowledged ids, plus the puts sent after it
    whose answers never came (a kill may have cut them off after the commit)."""

    def __init__(self) -> None:
        self.acked: dict[str, list[int]] = {}
        self.unacked: dict[str, list[list[int]]] = {}
        self.touched: set[str] = set()  # sessions written to since the last check
        self.lock = threading.Lock()

    def sending(self, name: str, ids: list[int]) -> None:
        with self.lock:
            self.unacked.setdefault(name, []).append(ids)
            self.touched.add(name)

    def acked_put(self, name: str, ids: list[int]) -> None:
        with self.lock:
            self.acked[name] = ids
            self.unacked[name] = []

    def check(self, name: str, got: list[int] | None) -> str | None:
        ok = ([self.acked[name]] if name in self.acked else []) + self.unacked.get(name, [])
        if got is None:
            return None if name not in self.acked else "lost"
        if any(got == ids for ids in ok):
            return None
        return "partial or stale"


def kill_round(url: str, clients: int, ledger: Ledger, state: dict, rng: random.Random,
               vocab: int, run_s: float) -> tuple[list[int], list, threading.Event]:
    """Clients extend sessions until the server dies (it is killed after ``run_s``)."""
    dead = threading.Event()
    acks = [0]

    def client(k: int) -> None:
        c = Client(url, timeout=30)
        r = random.Random(rng.random())
        while not dead.is_set():
            name, ids = state.get(k) or (f"k{k}-{uuid.uuid4().hex[:8]}", [])
            if len(ids) > 90 or r.random() < 0.1:
                name, ids = f"k{k}-{uuid.uuid4().hex[:8]}", []
            new = ids + [r.randrange(3, vocab) for _ in range(r.randint(3, 12))]
            ledger.sending(name, new)
            try:
                c.put(name, ids=new)
            except ServerError:
                return  # the server is gone (or going): this put stays unacknowledged
            ledger.acked_put(name, new)
            state[k] = (name, new)
            acks[0] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(run_s)
    return acks, threads, dead


def read_all(url: str, names: list[str], threads: int) -> list:
    """Every session's ids (None: 404), read by concurrent clients (the server decodes
    concurrent reads as one group)."""
    out: list = [None] * len(names)

    def reader(k: int) -> None:
        c = Client(url, timeout=120)
        for i in range(k, len(names), threads):
            try:
                out[i] = c.get(names[i])["ids"]
            except ServerError as e:
                out[i] = None if e.status == 404 else e

    ts = [threading.Thread(target=reader, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def kill_phase(db: str, model: str | None, clients: int, kills: int, seed: int,
               vocab: int, budget_s: float) -> dict:
    """``kills`` rounds (fewer if ``budget_s`` runs out); after each restart the sessions
    written in the round are checked, after the last one every session, and then the
    background compactor is given up to 300 s to code every edge. A round starts once the
    compactor process has loaded its model, so kills land in compactions too."""
    rng = random.Random(seed)
    ledger, state = Ledger(), {}
    failures, acked_total, startups, compactor_s, verify_s = [], 0, [], [], []
    coded, rounds_coding = 0, 0  # coded edges at the last restart; rounds that coded some
    deadline, done = time.monotonic() + budget_s, 0
    for i in range(kills + 1):
        last = i == kills or time.monotonic() > deadline
        srv = Server(db, model, "--compact-interval", "0.1", wait_compactor=True)
        startups.append(srv.startup_s)
        compactor_s.append(srv.compactor_s)
        c = Client(srv.url, timeout=120)
        t0 = time.perf_counter()
        names = sorted(set(ledger.acked) | set(ledger.unacked)) if last else \
            sorted(ledger.touched)
        ledger.touched = set()
        for name, got in zip(names, read_all(srv.url, names, clients), strict=True):
            if isinstance(got, Exception):
                failures.append(f"round {i}: {name}: {got}")
                continue
            problem = ledger.check(name, got)
            if problem:
                failures.append(f"round {i}: {name}: {problem}")
            elif got is not None:  # what the store holds is now the acknowledged state
                ledger.acked_put(name, got)
        verify_s.append(time.perf_counter() - t0)
        for k, (name, _) in list(state.items()):  # clients continue from what is stored
            if name in ledger.acked:
                state[k] = (name, ledger.acked[name])
            else:
                del state[k]
        st = c.stats()
        rounds_coding += st["edges"] - st["raw_edges"] > coded
        coded = st["edges"] - st["raw_edges"]
        if last:
            t0 = time.perf_counter()
            while st["raw_edges"] and time.perf_counter() - t0 < 300:
                time.sleep(0.5)
                st = c.stats()
            final_compaction_s = time.perf_counter() - t0
            srv.stop()
            break
        done += 1
        acks, threads, dead = kill_round(srv.url, clients, ledger, state, rng, vocab,
                                         rng.uniform(0.3, 1.2))
        srv.kill()
        dead.set()
        for t in threads:
            t.join(timeout=60)
        acked_total += acks[0]
    return {"kills": done, "kills_asked": kills, "clients": clients,
            "acknowledged_puts": acked_total,
            "sessions_checked": len(ledger.acked), "failures": len(failures),
            "failure_messages": failures[:10],
            "startup_s_median": statistics.median(startups), "startup_s_max": max(startups),
            "compactor_ready_s_median": statistics.median(compactor_s),
            "verify_s_median": statistics.median(verify_s),
            "restarts_after_a_round_that_coded_edges": rounds_coding,
            "final_sessions": st["sessions"], "final_raw_edges": st["raw_edges"],
            "final_edges": st["edges"], "final_compaction_s": final_compaction_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0, help="phase 1 duration")
    ap.add_argument("--turns", type=int, default=4, help="turns per chat session")
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--db", default="sqlite")
    ap.add_argument("--model", default=None, help="phase 1's model (default SmolLM2)")
    ap.add_argument("--kill-model", default="tiny", help="phase 2's: tiny, default or a path")
    ap.add_argument("--kill-budget", type=float, default=420.0,
                    help="seconds for phase 2: fewer kills if it runs out (reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/store_loadtest_cpu.json")
    a = ap.parse_args()
    out = {"machine": platform.machine(), "cpus": os.cpu_count(), "db": a.db,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "loadavg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        def fresh(tag: str) -> str:
            if a.db == "sqlite":
                return str(Path(tmp) / f"{tag}.db")
            return f"{a.db}#load-{tag}-{uuid.uuid4().hex}"

        if a.seconds > 0:
            db = fresh("load")
            srv = Server(db, a.model, "--compact-interval", "0.5", wait_model=True)
            try:
                row = load_phase(srv.url, a.clients, a.seconds, a.turns, a.seed)
            finally:
                srv.stop()
            if a.db == "sqlite":
                row["store_file_bytes"] = sum(f.stat().st_size for f in Path(tmp).glob("load.db*"))
            out["load"] = {**row, "startup_s": srv.startup_s, "model_loaded_s": srv.model_s,
                           "loadavg_after": os.getloadavg()}
            print(json.dumps({"load": out["load"]}), flush=True)
        if a.kills > 0:
            kill_model, vocab = a.kill_model, 320
            if kill_model == "tiny":
                kill_model = str(tiny_model_dir(Path(tmp) / "tiny"))
            elif kill_model == "default":
                kill_model, vocab = None, 49152
            else:
                from transformers import AutoConfig

                vocab = AutoConfig.from_pretrained(kill_model).vocab_size
            t0 = time.perf_counter()
            row = kill_phase(fresh("kill"), kill_model, a.clients, a.kills, a.seed, vocab,
                             a.kill_budget)
            out["sigkill"] = {**row, "model": a.kill_model, "seconds": time.perf_counter() - t0,
                              "loadavg_after": os.getloadavg()}
            print(json.dumps({"sigkill": out["sigkill"]}), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
