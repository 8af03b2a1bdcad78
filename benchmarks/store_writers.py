"""PLT store write path: concurrent writer processes, put latency with many clients, puts
through `seqkv serve`, and a store that is truly busy.

    python benchmarks/store_writers.py [--db sqlite|redis://127.0.0.1:6379/14]
        [--writers 4] [--puts 100] [--clients 8] [--client-puts 50]
        [--modes single,writers,clients,compactor,server,busy]
        [--out benchmarks/results/store_writers_cpu.json]

Sessions: a ``--shared``-token prefix (Brown news) and their own continuation (other Brown
texts), SmolLM2 token ids (``--tokens`` in all), one session per put. After every mode every
session is read back exactly in a fresh store and unique tokens = distinct prefixes.

- ``writers``: ``--writers`` forked processes (one store connection each) x ``--puts`` puts,
  started together: errors, the wall time of each writer (slowest / fastest), latencies.
- ``clients``: ``--clients`` processes x ``--client-puts`` puts at once (the p99 goal).
- ``compactor``: the writers while a compactor process codes under the model.
- ``server``: ``--clients`` client processes put through `seqkv serve` (background
  compaction on, coding under the model in the same process meanwhile), then every session
  is read back through the server.
- ``busy``: another connection holds the write lock longer than the busy bound
  ($SEQKV_STORE_BUSY_TIMEOUT=1): `seqkv store put` must answer "store busy, retry", exit 1.

"busy" in a row counts StoreBusyError answers (retried, as a client would); an error is any
other exception.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from corpora import brown  # noqa: E402

from seqkv.client import start_server, stop_server  # noqa: E402
from seqkv.core.models import load_model  # noqa: E402
from seqkv.store import Store, StoreBusyError  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summary(lat: list[float], wall: float, busy: int, errors: int = 0) -> dict:
    return {"puts": len(lat), "p50_ms": 1e3 * statistics.median(lat),
            "p99_ms": 1e3 * pct(lat, 0.99), "max_ms": 1e3 * max(lat),
            "puts_per_s": len(lat) / wall, "busy": busy, "errors": errors}


def sessions_for(lm, n: int, tokens: int, shared: int) -> list[tuple[str, list[int]]]:
    texts = brown("a", 44)
    tok = lm.tokenizer
    prefix = tok(texts[0]).input_ids[:shared]
    own = [tok(t).input_ids for t in texts[1:]]
    out = []
    for i in range(n):
        ids = own[i % len(own)]
        start = (i // len(own)) * 17
        out.append((f"s{i}", prefix + ids[start : start + tokens - shared]))
    assert len({tuple(ids) for _, ids in out}) == n
    return out


_LM = None  # the parent's model, inherited by forked writers (puts never run it)


def _writer(db: str, work: list, go, out) -> None:
    s = Store(db, _LM)
    go.wait()
    lat, busy, errors, t0 = [], 0, [], time.perf_counter()
    for name, ids in work:
        for _ in range(1000):  # a busy answer is retried by the caller, as a client would
            t = time.perf_counter()
            try:
                s.put(name, ids)
                lat.append(time.perf_counter() - t)
                break
            except StoreBusyError:
                busy += 1
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(e).__name__}: {e}")
                break
    out.put((lat, busy, time.perf_counter() - t0, errors))


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


def run_processes(target, args_of, n: int) -> list:
    """``n`` forked processes, started together. The parent's objects (the model, torch) are
    frozen out of the garbage collector first: a collection in a child would otherwise walk
    (and copy, page by page) the whole inherited heap, a stall of the benchmark's own
    processes that no writer or client of the store pays."""
    gc.freeze()
    ctx = mp.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_of(i), go, out)) for i in range(n)]
    for p in procs:
        p.start()
    time.sleep(1.0)
    go.set()
    results = [out.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    return results


def concurrent(db: str, lm, sessions, writers: int, compactor_model: str | None | bool,
               tmp: Path) -> dict:
    """``writers`` forked processes put together (each its share of ``sessions``); with
    ``compactor_model`` (not False) a compactor codes under the model meanwhile."""
    global _LM
    _LM = lm
    comp = None
    Store(db, lm).put("warm-up", sessions[0][1][:8])  # the store exists before they start
    if compactor_model is not False:
        comp = start_compactor(db, compactor_model, tmp)
    results = run_processes(_writer, lambda i: (db, sessions[i::writers]), writers)
    coded = None
    if comp:
        coded = Store(db, lm).stats()["bits_total"] > 0
        comp[1].write_text("stop")
        comp[0].wait(timeout=600)
    Store(db, lm).delete("warm-up")
    lat = [x for r in results for x in r[0]]
    walls = [r[2] for r in results]
    errors = [e for r in results for e in r[3]]
    row = summary(lat, max(walls), sum(r[1] for r in results), len(errors))
    row.update(writers=writers, puts_per_writer=len(sessions) // writers,
               compactor=comp is not None, writer_wall_s=walls,
               slowest_over_fastest=max(walls) / min(walls),
               writer_mean_ms=[1e3 * statistics.mean(r[0]) for r in results if r[0]],
               error_messages=errors[:5], verified=check(db, lm, sessions))
    if comp:
        row["compactor_had_coded_edges"] = coded
    return row


def _http_client(url: str, work: list, go, out) -> None:
    from seqkv.client import Client, ServerError

    c = Client(url)
    go.wait()
    lat, busy, errors, t0 = [], 0, [], time.perf_counter()
    for name, ids in work:
        for _ in range(1000):
            t = time.perf_counter()
            try:
                c.put(name, ids=ids)
                lat.append(time.perf_counter() - t)
                break
            except ServerError as e:
                if e.status == 503:
                    busy += 1
                    continue
                errors.append(str(e))
                break
    out.put((lat, busy, time.perf_counter() - t0, errors))


def serve(db: str, model: str | None, *extra: str) -> tuple[subprocess.Popen, str]:
    """`seqkv serve`, once it takes requests and its model has loaded (in the background:
    the puts are timed in the steady state, not while the model loads)."""
    return start_server(db, *extra, *(["--model", model] if model else []), model=True)


def through_server(db: str, model: str | None, lm, sessions, clients: int) -> dict:
    from seqkv.client import Client

    proc, url = serve(db, model, "--compact-interval", "0.2")
    try:
        results = run_processes(_http_client, lambda i: (url, sessions[i::clients]), clients)
        lat = [x for r in results for x in r[0]]
        walls = [r[2] for r in results]
        errors = [e for r in results for e in r[3]]
        c = Client(url)
        pending_after_puts = c.stats()["raw_edges"]
        for name, ids in sessions:  # read back through the server
            assert c.get(name)["ids"] == ids
        row = summary(lat, max(walls), sum(r[1] for r in results), len(errors))
        row.update(clients=clients, slowest_over_fastest=max(walls) / min(walls),
                   raw_edges_when_puts_done=pending_after_puts, error_messages=errors[:5],
                   verified=len(sessions))
        return row
    finally:
        stop_server(proc, timeout=120)


def busy_store(db: str, lm, model: str | None) -> dict:
    """Hold the write lock past the busy bound; the CLI must say "store busy, retry"."""
    Store(db, lm).put("busy-a", [5, 6, 7])
    if db.startswith(("redis://", "rediss://")):
        import redis

        from seqkv.store.redis import _key

        url, _, prefix = db.partition("#")
        r = redis.Redis.from_url(url)
        key = _key(f"seqkv:{prefix}" if prefix else "seqkv", "default", "lock")
        r.set(key, "someone-else", px=60_000)
        release = lambda: r.delete(key)  # noqa: E731
    else:
        import sqlite3

        con = sqlite3.connect(db, isolation_level=None)
        con.execute("BEGIN IMMEDIATE")
        release = lambda: (con.execute("ROLLBACK"), con.close())  # noqa: E731
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("A session written while another writer holds the store.")
    try:
        cmd = [sys.executable, "-m", "seqkv", "store", "put", "--db", db, "--session", "busy-b",
               f.name] + (["--model", model] if model else [])
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True,
                           env={**os.environ, "SEQKV_STORE_BUSY_TIMEOUT": "1"})
        seconds = time.perf_counter() - t0
    finally:
        release()
        os.unlink(f.name)
    err = p.stderr.strip().splitlines()
    return {"exit_code": p.returncode, "stderr_last_line": err[-1] if err else "",
            "says_busy_retry": "store busy, retry" in p.stderr,
            "internal_error": "internal error" in p.stderr, "cli_seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--puts", type=int, default=100, help="puts per writer process")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--client-puts", type=int, default=50, help="puts per client")
    ap.add_argument("--tokens", type=int, default=140)
    ap.add_argument("--shared", type=int, default=128)
    ap.add_argument("--db", default="sqlite", help="sqlite (a temporary file) or a Redis URL")
    ap.add_argument("--model", default=None)
    ap.add_argument("--modes", default="single,writers,clients,compactor,server,busy")
    ap.add_argument("--out", default="benchmarks/results/store_writers_cpu.json")
    a = ap.parse_args()
    modes = a.modes.split(",")
    lm = load_model(a.model)
    n = max(a.writers * a.puts, a.clients * a.client_puts)
    sessions = sessions_for(lm, n, a.tokens, a.shared)
    w_sessions = sessions[: a.writers * a.puts]
    c_sessions = sessions[: a.clients * a.client_puts]
    rows = {}
    load = {"loadavg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        def fresh(tag: str) -> str:
            if a.db == "sqlite":
                return str(Path(tmp) / f"{tag}.db")
            return f"{a.db}#bench-{tag}-{uuid.uuid4().hex}"

        def done(name: str, row: dict) -> None:
            rows[name] = {**row, "loadavg_after": os.getloadavg()}
            print(json.dumps({name: rows[name]}), flush=True)

        if "single" in modes:
            db = fresh("single")
            s = Store(db, lm)
            lat, t0 = [], time.perf_counter()
            for name, ids in w_sessions:
                t = time.perf_counter()
                s.put(name, ids)
                lat.append(time.perf_counter() - t)
            done("one writer", {**summary(lat, time.perf_counter() - t0, 0), "writers": 1,
                                "verified": check(db, lm, w_sessions)})
        if "writers" in modes:
            done(f"{a.writers} writers x {a.puts} puts",
                 concurrent(fresh("conc"), lm, w_sessions, a.writers, False, Path(tmp)))
        if "clients" in modes:
            done(f"{a.clients} clients x {a.client_puts} puts",
                 concurrent(fresh("clients"), lm, c_sessions, a.clients, False, Path(tmp)))
        if "compactor" in modes:
            done(f"{a.writers} writers + compactor",
                 concurrent(fresh("comp"), lm, w_sessions, a.writers, a.model, Path(tmp)))
        if "server" in modes:
            done(f"server, {a.clients} clients",
                 through_server(fresh("server"), a.model, lm, c_sessions, a.clients))
        if "busy" in modes:
            done("busy store (CLI)", busy_store(fresh("busy"), lm, a.model))
    out = {"machine": platform.machine(), "cpus": os.cpu_count(), "db": a.db,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "tokens_per_session": a.tokens, "shared": a.shared, **load, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
