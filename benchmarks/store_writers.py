"""PLT store write path: put latency (p50 / p99) alone, with concurrent writer processes while
a compactor codes under the model, and through `seqkv serve` with background compaction.

    python benchmarks/store_writers.py [--writers 4] [--puts 40] [--tokens 256] [--shared 128]
        [--db sqlite|redis://127.0.0.1:6379/14] [--out benchmarks/results/store_writers_cpu.json]

Sessions: a ``--shared``-token prefix (Brown news) and their own continuation (other Brown
texts), SmolLM2 token ids; every put is checked afterwards (every session reads back exactly,
unique tokens = distinct prefixes). Writers are forked processes (one store connection each)
started together; "busy" counts StoreBusyError ("store busy, retry") answers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from corpora import brown  # noqa: E402

from seqkv.core.models import load_model  # noqa: E402
from seqkv.store import Store, StoreBusyError  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summary(lat: list[float], wall: float, busy: int) -> dict:
    return {"puts": len(lat), "p50_ms": 1e3 * statistics.median(lat),
            "p99_ms": 1e3 * pct(lat, 0.99), "max_ms": 1e3 * max(lat),
            "puts_per_s": len(lat) / wall, "busy": busy}


def sessions_for(lm, n: int, tokens: int, shared: int) -> list[tuple[str, list[int]]]:
    texts = brown("a", 44)
    tok = lm.tokenizer
    prefix = tok(texts[0]).input_ids[:shared]
    out = []
    for i in range(n):
        own = tok(texts[1 + i % (len(texts) - 1)]).input_ids
        start = (i // (len(texts) - 1)) * 17
        out.append((f"s{i}", prefix + own[start : start + tokens - shared]))
    return out


_LM = None  # the parent's model, inherited by forked writers


def _writer(db: str, work: list, go, out) -> None:
    s = Store(db, _LM)
    go.wait()
    lat, busy, t0 = [], 0, time.perf_counter()
    for name, ids in work:
        for _ in range(100):  # a busy answer is retried by the caller, as a client would
            t = time.perf_counter()
            try:
                s.put(name, ids)
                lat.append(time.perf_counter() - t)
                break
            except StoreBusyError:
                busy += 1
    out.put((lat, busy, time.perf_counter() - t0))


_COMPACTOR = """
import sys, time
from pathlib import Path
from seqkv.core.models import load_model
from seqkv.store import Store
s = Store({db!r}, load_model({model!r}))
Path({ready!r}).write_text("ready")
while not Path({stop!r}).exists():
    s.compact(batch=4, max_rounds=1)
    time.sleep(0.01)
"""


def start_compactor(db: str, model: str | None, tmp: Path) -> tuple[subprocess.Popen, Path]:
    """A compactor in its own interpreter (a forked one would share torch's thread pool and
    hang): it codes pending edges under the model, 4 a round, until ``stop`` exists."""
    ready, stop = tmp / f"ready-{uuid.uuid4().hex}", tmp / f"stop-{uuid.uuid4().hex}"
    code = _COMPACTOR.format(db=db, model=model, ready=str(ready), stop=str(stop))
    p = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    while not ready.exists():
        assert p.poll() is None, p.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    return p, stop


def check(db: str, lm, sessions) -> int:
    s = Store(db, lm)
    for name, ids in sessions:
        assert s.get_ids(name) == ids, name
    prefixes = {tuple(ids[: i + 1]) for _, ids in sessions for i in range(len(ids))}
    assert s.stats()["tokens_unique"] == len(prefixes)
    return len(sessions)


def concurrent(db: str, lm, sessions, writers: int, compactor_model: str | None | bool,
               tmp: Path) -> dict:
    """``writers`` forked processes put together; with ``compactor_model`` (not False) a
    compactor codes under the model meanwhile."""
    global _LM
    _LM = lm
    comp = None
    if compactor_model is not False:
        Store(db, lm).put("warm-up", sessions[0][1][:8])  # a store for the compactor to open
        comp = start_compactor(db, compactor_model, tmp)
    ctx = mp.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(db, sessions[i::writers], go, out))
             for i in range(writers)]
    for p in procs:
        p.start()
    time.sleep(1.0)
    go.set()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    coded = None
    if comp:
        coded = Store(db, lm).stats()["bits_total"] > 0
        comp[1].write_text("stop")
        comp[0].wait(timeout=600)
        Store(db, lm).delete("warm-up")
    lat = [x for r in results for x in r[0]]
    row = summary(lat, max(r[2] for r in results), sum(r[1] for r in results))
    row.update(writers=writers, compactor=comp is not None, verified=check(db, lm, sessions))
    if comp:
        row["compactor_had_coded_edges"] = coded
    return row


def through_server(db: str, model: str | None, lm, sessions, clients: int) -> dict:
    from seqkv.client import Client

    port = 18000 + os.getpid() % 1000
    cmd = [sys.executable, "-m", "seqkv", "serve", "--db", db, "--port", str(port),
           "--compact-interval", "0.2"] + (["--model", model] if model else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            try:
                urllib.request.urlopen(url + "/healthz", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        lats: list[float] = []
        lock = threading.Lock()

        def client(work):
            c = Client(url)
            for name, ids in work:
                t = time.perf_counter()
                c.put(name, ids=ids)
                with lock:
                    lats.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(sessions[i::clients],))
                   for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        c = Client(url)
        pending_after_puts = c.stats()["raw_edges"]
        for name, ids in sessions:  # read back through the server (mostly raw edges yet)
            assert c.get(name)["ids"] == ids
        t0 = time.perf_counter()
        c.compact()
        compact_s = time.perf_counter() - t0
        st = c.stats()
        row = summary(lats, wall, 0)
        row.update(clients=clients, raw_edges_when_puts_done=pending_after_puts,
                   final_compact_s=compact_s, raw_edges_after=st["raw_edges"],
                   verified=len(sessions))
        return row
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--puts", type=int, default=40, help="puts per mode")
    ap.add_argument("--tokens", type=int, default=140)
    ap.add_argument("--shared", type=int, default=128)
    ap.add_argument("--db", default="sqlite", help="sqlite (a temporary file) or a Redis URL")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="benchmarks/results/store_writers_cpu.json")
    a = ap.parse_args()
    lm = load_model(a.model)
    sessions = sessions_for(lm, a.puts, a.tokens, a.shared)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        def fresh(tag: str) -> str:
            if a.db == "sqlite":
                return str(Path(tmp) / f"{tag}.db")
            return f"{a.db}#bench-{tag}-{uuid.uuid4().hex}"

        db = fresh("single")
        s = Store(db, lm)
        lat, t0 = [], time.perf_counter()
        for name, ids in sessions:
            t = time.perf_counter()
            s.put(name, ids)
            lat.append(time.perf_counter() - t)
        rows["one writer"] = {**summary(lat, time.perf_counter() - t0, 0), "writers": 1,
                              "verified": check(db, lm, sessions)}
        t0 = time.perf_counter()
        r = s.compact()
        rows["compaction (one stream)"] = {
            "edges": r.edges, "tokens": r.tokens, "seconds": time.perf_counter() - t0,
            "tokens_per_s": r.tokens / (time.perf_counter() - t0),
            "bits_per_token": r.coded_bits / max(r.tokens, 1)}
        print(json.dumps(rows, indent=1), flush=True)
        rows[f"{a.writers} writers"] = concurrent(fresh("conc"), lm, sessions, a.writers, False,
                                                  Path(tmp))
        print(json.dumps(rows[f"{a.writers} writers"]), flush=True)
        rows[f"{a.writers} writers + compactor"] = concurrent(fresh("comp"), lm, sessions,
                                                             a.writers, a.model, Path(tmp))
        print(json.dumps(rows[f"{a.writers} writers + compactor"]), flush=True)
        rows[f"server, {a.writers} clients"] = through_server(fresh("server"), a.model, lm,
                                                             sessions, a.writers)
        print(json.dumps(rows[f"server, {a.writers} clients"]), flush=True)
    out = {"machine": platform.machine(), "cpus": os.cpu_count(), "db": a.db,
           "sessions": len(sessions), "tokens_per_session": a.tokens, "shared": a.shared,
           "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
