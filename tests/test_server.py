"""`seqkv serve` end to end: a real uvicorn server in a subprocess on a loopback port, driven
through seqkv.client (and raw HTTP for malformed requests): the API contract, auth and
namespace isolation (path tricks included), size limits, the CLI's --server, and two server
processes sharing one Redis store."""

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from seqkv import server as server_mod
from seqkv.cli import build_app
from seqkv.client import Client, NotFound, ServerError, start_server, stop_server
from seqkv.store import ModelNeededError

from .test_store_backends import REDIS_URL, _redis_up

runner = CliRunner()
TEXT_A = "The quick brown fox jumps over the lazy dog."
TEXT_B = "The quick brown cat sleeps."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with a small byte-level BPE tokenizer, saved as an HF directory, so
    `seqkv serve --model DIR` loads it like any model (seqkv.testing)."""
    from seqkv.testing import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def lm(model_dir):
    from seqkv.core.models import load_model

    return load_model(str(model_dir))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, db: str, *args: str, env: dict | None = None) -> None:
        self.proc, self.url = start_server(db, "--model", str(model_dir), *args, timeout=180,
                                           stdout=subprocess.PIPE,
                                           env={**os.environ, **(env or {})})
        self.port = int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        stop_server(self.proc, timeout=30)


@pytest.fixture
def start(model_dir):
    servers = []

    def go(db: str, *args: str, env: dict | None = None) -> Server:
        servers.append(Server(model_dir, db, *args, env=env))
        return servers[-1]

    yield go
    for s in servers:
        s.stop()


def raw(url: str, method: str, path: str, body: bytes | None = None,
        headers: dict | None = None) -> tuple[int, dict | bytes]:
    """One HTTP request as sent, the status and the JSON (or bytes) answered."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    if r.getheader("content-type", "").startswith("application/json"):
        return r.status, json.loads(data)
    return r.status, data


def test_api_contract_end_to_end(tmp_path, start, lm):
    from seqkv.core.cache import KVCache, parse_cachefile, prefill_cache

    db = str(tmp_path / "store.db")
    srv = start(db, "--max-body", "4096", "--compact-interval", "0")
    c = Client(srv.url)
    assert c.healthz()
    a = c.put("a", text=TEXT_A)
    assert a["created"] and a["tokens"] == len(lm.tokenizer(TEXT_A).input_ids)
    b = c.put("b", text=TEXT_B)
    assert b["shared_tokens"] > 0 and b["new_tokens"] == b["tokens"] - b["shared_tokens"]
    ids = [5, 6, 7, 8, 9, 10]
    status, body = raw(srv.url, "PUT", "/v1/sessions/n", json.dumps({"ids": ids}).encode(),
                       {"Content-Type": "application/json"})
    assert (status, body["created"]) == (201, True)
    status, body = raw(srv.url, "PUT", "/v1/sessions/n", json.dumps({"ids": ids}).encode(),
                       {"Content-Type": "application/json"})
    assert (status, body["created"]) == (200, False)  # replaced
    with pytest.raises(ServerError) as e:
        c.put("n", ids=ids, replace=False)
    assert e.value.status == 409
    assert c.get("a") == {"session": "a", "ids": lm.tokenizer(TEXT_A).input_ids, "text": TEXT_A}
    assert c.get("n") == {"session": "n", "ids": ids, "text": None}
    st = c.stats()
    assert st["raw_edges"] > 0 and st["sessions"] == 3  # durable, not coded yet
    r = c.compact()
    assert r["pending"] == 0 and r["edges"] == st["raw_edges"] and r["coded_bits"] > 0
    st = c.stats()
    assert st["raw_edges"] == 0 and st["bits_total"] == r["coded_bits"]
    cli = runner.invoke(build_app(), ["store", "stats", "--db", db, "--json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout).items() <= st.items()  # `store stats --json`'s fields
    assert c.get("a")["text"] == TEXT_A  # now decoded from its coded edges
    # the restored KV cache, in kv-dump's interchange format, equals a prefill bit for bit
    kv = parse_cachefile(c.get_cache("a"))
    full = prefill_cache(lm.model, lm.tokenizer(TEXT_A).input_ids)
    assert kv.equal_bits(KVCache.from_dynamic(full.cache, full.input_ids))
    rows = c.nearest(text="The quick brown fox sat", k=2)
    assert rows[0]["session"] == "a" and rows[0]["shared_tokens"] >= rows[1]["shared_tokens"]
    assert c.delete("b") == {"session": "b", "deleted": True}
    with pytest.raises(NotFound):
        c.get("b")
    with pytest.raises(NotFound):
        c.delete("b")
    assert set(c.get("a")) == {"session", "ids", "text"}
    # OpenAPI docs
    status, spec = raw(srv.url, "GET", "/openapi.json")
    assert status == 200 and "/v1/sessions/{session}/cache" in spec["paths"]
    assert raw(srv.url, "GET", "/docs")[0] == 200


def test_malformed_requests_get_json_errors(tmp_path, start):
    db = str(tmp_path / "store.db")
    srv = start(db, "--max-body", "4096", "--compact-interval", "0",
                env={"SEQKV_STORE_BUSY_TIMEOUT": "0.5"})
    j = {"Content-Type": "application/json"}

    def put(body: bytes, path="/v1/sessions/x", headers=j):
        return raw(srv.url, "PUT", path, body, headers)

    cases = [
        (put(b"{not json"), 422),
        (put(b'{"text": 5}'), 422),
        (put(b'{"ids": ["a"]}'), 422),
        (put(b'{"ids": [true]}'), 422),
        (put(b'{"text": "hi", "other": 1}'), 422),
        (put(b"[]"), 422),
        (put(b'{"text": "hi", "ids": [5]}'), 400),
        (put(b"{}"), 400),
        (put(b'{"ids": []}'), 400),
        (put(b'{"ids": [99999]}'), 400),  # outside the vocabulary
        (put(b'{"ids": [-1]}'), 400),
        (put(b'{"text": ""}'), 400),
        (put(b'{"text": "hi"}', "/v1/sessions/a%20b"), 400),  # a space in the id
        (put(b'{"ids": [5]}' + b" " * 5000), 413),  # over --max-body 4096
        (raw(srv.url, "GET", "/v1/nope"), 404),
        (raw(srv.url, "PATCH", "/v1/sessions/x"), 405),
        (raw(srv.url, "POST", "/v1/nearest", b'{"text": "hi", "k": 0}', j), 422),
        (raw(srv.url, "GET", "/v1/sessions/never"), 404),
    ]
    for i, ((status, body), expected) in enumerate(cases):
        assert status == expected, (i, status, body)
        assert isinstance(body, dict) and set(body) == {"error"} and body["error"], (i, body)
        assert "Traceback" not in body["error"]
    # a chunked body (no Content-Length) over the limit is refused while it streams
    host, port = srv.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("PUT", "/v1/sessions/x")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b'{"text": "' + b"a" * 3000
    for part in (chunk, b"b" * 3000, b'"}'):
        conn.send(b"%x\r\n%s\r\n" % (len(part), part))
    conn.send(b"0\r\n\r\n")
    r = conn.getresponse()
    assert r.status == 413 and "error" in json.loads(r.read())
    conn.close()
    assert Client(srv.url).stats()["sessions"] == 0  # nothing was stored by any of them
    # a store another writer keeps locked: 503 "store busy, retry", never an internal error
    import sqlite3

    con = sqlite3.connect(db, isolation_level=None)
    con.execute("BEGIN IMMEDIATE")
    try:
        status, body = raw(srv.url, "PUT", "/v1/sessions/x", b'{"ids": [5, 6]}', j)
    finally:
        con.execute("ROLLBACK")
        con.close()
    assert status == 503 and body["error"].startswith("store busy, retry"), (status, body)
    assert raw(srv.url, "PUT", "/v1/sessions/x", b'{"ids": [5, 6]}', j)[0] == 201
    # a stored record that fails its checksum is the server's fault: 500, one JSON line
    con = sqlite3.connect(db, isolation_level=None)
    row = con.execute("SELECT value FROM records WHERE kind = 'session' AND key = 'x'"
                      ).fetchone()
    assert row, list(con.execute("SELECT ns, kind, key FROM records"))
    (value,) = row
    value = bytearray(value)
    value[len(value) // 2] ^= 1
    con.execute("UPDATE records SET value = ? WHERE kind = 'session' AND key = 'x'",
                (bytes(value),))
    con.execute("UPDATE generations SET gen = gen + 1")
    con.close()
    status, body = raw(srv.url, "GET", "/v1/sessions/x")
    assert status == 500 and "corrupt" in body["error"] and set(body) == {"error"}, body


def test_api_keys_and_namespace_isolation(tmp_path, start):
    keys = tmp_path / "keys.json"
    ka, kb = "key-a-" + uuid.uuid4().hex, "key-b-" + uuid.uuid4().hex
    keys.write_text(json.dumps({ka: "tenant-a", kb: "tenant-b"}))
    srv = start(str(tmp_path / "store.db"), "--keys", str(keys), "--compact-interval", "0.2",
                "--device", "cpu")
    a, b = Client(srv.url, ka), Client(srv.url, kb)
    assert Client(srv.url).healthz()  # health needs no key
    for key in (None, "wrong", ka + "x", ka[:-1]):
        with pytest.raises(ServerError) as e:
            Client(srv.url, key or "").stats()
        assert e.value.status == 401
    status, body = raw(srv.url, "GET", "/v1/stats", headers={"Authorization": f"Basic {ka}"})
    assert status == 401 and set(body) == {"error"}
    status, _ = raw(srv.url, "PUT", "/v1/sessions/x", b'{"ids": [5]}',
                    {"Content-Type": "application/json"})
    assert status == 401  # no key, no write
    a.put("secret", ids=[5, 6, 7, 8])
    a.put("shared-name", ids=[9, 9])
    b.put("shared-name", ids=[10, 11])
    assert a.get("shared-name")["ids"] == [9, 9] and b.get("shared-name")["ids"] == [10, 11]
    never = raw(srv.url, "GET", "/v1/sessions/never-existed",
                headers={"Authorization": f"Bearer {kb}"})
    other = raw(srv.url, "GET", "/v1/sessions/secret", headers={"Authorization": f"Bearer {kb}"})
    assert other == never and other[0] == 404  # indistinguishable from a missing session
    tricks = ["/v1/sessions/..%2Fsecret", "/v1/sessions/%2E%2E/secret",
              "/v1/sessions/secret/../secret", "/v1/sessions/tenant-a%2Fsecret",
              "/v1/sessions/tenant-a:secret", "/v1/sessions/%73ecret%00",
              "/v1/../v1/sessions/secret/cache", "/v1/sessions/secret%2Fcache"]
    for path in tricks:
        for method in ("GET", "DELETE"):
            status, body = raw(srv.url, method, path, headers={"Authorization": f"Bearer {kb}"})
            assert status in (400, 404, 405), (method, path, status, body)
            assert isinstance(body, dict) and set(body) == {"error"}, (method, path, body)
    for call in (lambda: b.get("secret"), lambda: b.get_cache("secret"),
                 lambda: b.delete("secret")):
        with pytest.raises(NotFound):
            call()
    hb = {"Authorization": f"Bearer {kb}", "Content-Type": "application/json"}
    for sid in ("secret", "never-existed"):  # A's id is free in B's namespace, like any other
        status, body = raw(srv.url, "PUT", f"/v1/sessions/{sid}?replace=false", b'{"ids": [5]}',
                           hb)
        assert status == 201 and body["created"], body
        assert raw(srv.url, "DELETE", f"/v1/sessions/{sid}", None, hb)[0] == 200
    for n in (257, 10_000):  # overlong ids: refused alike, whatever exists
        assert raw(srv.url, "GET", "/v1/sessions/" + "s" * n, None, hb) == \
            raw(srv.url, "GET", "/v1/sessions/" + "t" * n, None, hb)
    assert b.stats()["sessions"] == 1 and a.stats()["sessions"] == 2
    assert [r["session"] for r in b.nearest(ids=[5, 6, 7])] == ["shared-name"]
    assert a.get("secret")["ids"] == [5, 6, 7, 8]  # untouched by b's attempts
    deadline = time.monotonic() + 60  # the background compactor codes both namespaces
    while a.stats()["raw_edges"] or b.stats()["raw_edges"]:
        assert time.monotonic() < deadline, "background compaction did not run"
        time.sleep(0.2)
    assert a.get("secret")["ids"] == [5, 6, 7, 8]
    health = a.health()
    assert (health["compactor"], health["device"]) == ("running", "cpu")
    # the compactor is a child process that dies with the server, SIGKILL included
    pid = srv.proc.pid
    [child] = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    srv.proc.kill()
    srv.proc.wait()
    deadline = time.monotonic() + 30
    while _alive(int(child)):
        assert time.monotonic() < deadline, "the compactor outlived the server"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:  # the state after "(name)": Z (a zombie) is dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_raw_edges_need_no_model_and_idle_connections_are_replaced(tmp_path, model_dir, lm,
                                                                   monkeypatch):
    """The write path and reads of raw edges need no model: a server whose model cannot load
    (its weights file is gone) still answers /healthz at once, takes puts of ids (range-checked
    against the vocabulary the store recorded) and returns raw sessions; what needs the model
    (text) is refused with a clear 500. And a kept-alive client connection that the server
    closed while idle is replaced without the caller seeing it."""
    import shutil

    import seqkv.client as client_mod
    from seqkv.store import Store

    db = str(tmp_path / "store.db")
    with Store(db, lm) as s:
        s.put("old", [5, 6, 7])
    broken = tmp_path / "broken-model"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").unlink()
    srv = Server(broken, db, "--compact-interval", "0")
    try:
        c = Client(srv.url)
        health = c._json("GET", "/healthz")
        while health["model"] == "loading":
            time.sleep(0.1)
            health = c._json("GET", "/healthz")
        assert health == {"status": "ok", "model": "failed", "compactor": "off",
                          "device": "cpu", "tiers": "off", "rebalances": 0}
        assert c.put("a", ids=[5, 6, 7, 8])["created"]
        assert c.get("a") == {"session": "a", "ids": [5, 6, 7, 8], "text": None}
        assert c.get("old")["ids"] == [5, 6, 7]
        with pytest.raises(ServerError) as e:
            c.put("b", ids=[5, 320])
        assert e.value.status == 400 and "vocabulary of 320" in str(e.value)
        with pytest.raises(ServerError) as e:
            c.put("b", text=TEXT_A)
        assert e.value.status == 500 and "model could not be loaded" in str(e.value)
        assert c.delete("old")["deleted"]
        # the server closes an idle connection after 5 s; this client would keep it longer
        monkeypatch.setattr(client_mod, "KEEP_ALIVE_S", 60.0)
        first = c._local.conn
        time.sleep(5.5)
        assert c.get("a")["ids"] == [5, 6, 7, 8] and c._local.conn is not first
    finally:
        srv.stop()
    with Store(db, lm) as s:  # what the model-less server wrote is an ordinary store
        assert s.sessions() == ["a"] and s.get_ids("a") == [5, 6, 7, 8]
        assert s.compact().pending == 0


def test_serve_refuses_non_loopback_without_keys_and_bad_keys(tmp_path):
    app = build_app()
    r = runner.invoke(app, ["serve", "--db", str(tmp_path / "s.db"), "--host", "0.0.0.0"])
    assert r.exit_code == 1 and "non-loopback" in r.output
    assert len(r.output.strip().splitlines()) == 1
    bad = tmp_path / "keys.json"
    for content in ("{not json", "[]", "{}", '{"k": ""}'):
        bad.write_text(content)
        r = runner.invoke(app, ["serve", "--db", str(tmp_path / "s.db"), "--keys", str(bad)])
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "s.db").exists()


def test_serve_refuses_a_device_it_cannot_use_in_one_line(tmp_path):
    """--device: cpu, cuda or cuda:N, and a GPU this machine has; anything else is one line on
    stderr and exit 1 before the server listens (no traceback, no store created)."""
    app = build_app()
    bad = ["tpu", "cuda:x", "CPU", "cuda:99", ""]
    for device in bad:
        r = runner.invoke(app, ["serve", "--db", str(tmp_path / "s.db"), "--device", device])
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, (device, r.output)
        assert "--device" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "s.db").exists()
    done = subprocess.run([sys.executable, "-m", "seqkv", "serve", "--db", str(tmp_path / "s.db"),
                           "--device", "cuda:99"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == "", done
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("seqkv: error: --device cuda:99: "), line


def test_the_device_reaches_the_models_of_the_server_and_its_compactor(tmp_path, monkeypatch):
    """Service loads its model on --device, and starts its compactor process with it."""
    import seqkv.core.models as models
    from seqkv.core.errors import SeqkvError

    asked = []

    def load_model(spec=None, device="cpu", dtype=None):
        asked.append((spec, device))
        raise SeqkvError("not loaded here")

    monkeypatch.setattr(models, "load_model", load_model)
    service = server_mod.Service(str(tmp_path / "s.db"), "some-model", device="cuda:1",
                                 compact_interval=0)
    service._load_model()
    assert asked == [("some-model", "cuda:1")] and service.model_state == "failed"
    assert service.compactor_args()["device"] == "cuda:1"
    assert server_mod.check_device("cpu") == "cpu"


def test_store_cli_over_server(tmp_path, start, monkeypatch):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"k1-" + "x" * 20: "t1"}))
    srv = start(str(tmp_path / "store.db"), "--keys", str(keys), "--compact-interval", "0")
    app = build_app()
    (tmp_path / "in.txt").write_text(TEXT_A)
    monkeypatch.setenv("SEQKV_API_KEY", "k1-" + "x" * 20)
    base = ["--server", srv.url]
    r = runner.invoke(app, ["store", "put", "--session", "s", str(tmp_path / "in.txt"), *base,
                            "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["new_tokens"] > 0
    r = runner.invoke(app, ["store", "put", "--session", "s", str(tmp_path / "in.txt"), *base])
    assert r.exit_code == 1 and "exists" in r.output  # no --replace: refused, as with --db
    r = runner.invoke(app, ["store", "compact", *base, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["pending"] == 0, r.output
    r = runner.invoke(app, ["store", "get", "--session", "s", "-o", str(tmp_path / "o.txt"),
                            *base])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o.txt").read_text() == TEXT_A
    r = runner.invoke(app, ["store", "stats", *base, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["namespace"] == "t1"
    r = runner.invoke(app, ["store", "nearest", str(tmp_path / "in.txt"), *base, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["session"] == "s"
    r = runner.invoke(app, ["store", "delete", "--session", "s", *base])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["store", "delete", "--session", "s", *base])
    assert r.exit_code == 1 and "HTTP 404" in r.output
    r = runner.invoke(app, ["store", "stats", *base, "--api-key", "nope"])
    assert r.exit_code == 1 and "HTTP 401" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["store", "stats", "--server", f"http://127.0.0.1:{free_port()}"])
    assert r.exit_code == 1 and "cannot reach" in r.output


def _redis_db() -> str:
    if not _redis_up():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but no Redis answers at {REDIS_URL} (scripts/services.sh)")
        pytest.skip(f"no Redis at {REDIS_URL}")
    return f"{REDIS_URL}#test-{uuid.uuid4().hex}"


def test_two_servers_share_one_redis_store(start):
    db = _redis_db()
    one = Client(start(db, "--compact-interval", "0.3").url)
    two = Client(start(db, "--compact-interval", "0.3").url)
    one.put("a", text=TEXT_A)
    assert two.get("a")["text"] == TEXT_A
    two.put("b", text=TEXT_B)
    assert one.get("b")["text"] == TEXT_B
    # both write and both compact at once: nothing lost, nothing stored twice
    errors = []

    def writer(c, prefix):
        try:
            for i in range(6):
                c.put(f"{prefix}{i}", ids=[5, 6, 7, 8, 20 + i, 30 + i])
            c.compact()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(c, p)) for c, p in ((one, "x"), (two, "y"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    one.compact()
    st1, st2 = one.stats(), two.stats()
    assert st1 == st2 and st1["sessions"] == 14 and st1["raw_edges"] == 0
    for p in ("x", "y"):
        for i in range(6):
            assert two.get(f"{p}{i}")["ids"] == [5, 6, 7, 8, 20 + i, 30 + i]
    one.delete("x0")
    with pytest.raises(NotFound):
        two.get("x0")


def test_batcher_groups_concurrent_requests_and_answers_each_its_own():
    from seqkv.server import Batcher

    sizes = []

    def run(items):
        sizes.append(len(items))
        time.sleep(0.05)
        return [ValueError(i) if i % 5 == 0 else i * i for i in items]

    b = Batcher(run, max_batch=8)
    results = {}

    def call(i):
        try:
            results[i] = b.submit(i)
        except ValueError as e:
            results[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(1, 33)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == list(range(1, 33))
    for i, r in results.items():
        assert (isinstance(r, ValueError) and i % 5 == 0) or r == i * i
    assert sum(sizes) == 32 and max(sizes) <= 8 and len(sizes) < 32  # grouped
    assert b.submit(3) == 9  # alone: answered at once

    async def on_the_event_loop():  # as the server's handlers call it: no thread per request
        return await asyncio.gather(*(b.submit_async(i) for i in range(1, 11)),
                                    return_exceptions=True)

    before = len(sizes)
    got = asyncio.run(on_the_event_loop())
    assert [isinstance(r, ValueError) for r in got] == [i % 5 == 0 for i in range(1, 11)]
    assert [r for r in got if not isinstance(r, ValueError)] == [i * i for i in range(1, 11)
                                                                 if i % 5]
    assert len(sizes) - before < 10  # grouped


class _FakeStore:
    """put_many as the Store answers it: text needs the model, ids do not."""

    def __init__(self, service) -> None:
        self.service, self.lm = service, None

    def attach_model(self, lm) -> None:
        self.lm = lm

    def put_many(self, items):
        return [ModelNeededError("text needs the model") if isinstance(data, str)
                and self.lm is None else session for session, data, _ in items]


class _FakeService:
    def __init__(self, state: str) -> None:
        self.lm, self.model_state, self.loaded = None, state, threading.Event()

    def open_store(self, ns, wait=True):
        return _FakeStore(self)

    def model(self):
        if self.model_state == "failed":
            raise server_mod.ModelUnavailable("the server's model could not be loaded: broken")
        self.loaded.wait()
        return self.lm


def test_a_batch_keeps_its_committed_answers_when_the_model_failed():
    n = server_mod._Namespace(_FakeService("failed"), "default")
    out = n.with_model("writer", server_mod._put_many, [("a", [1, 2], True), ("b", "x", True)])
    assert out[0] == "a" and isinstance(out[1], server_mod.ModelUnavailable)


def test_puts_that_need_no_model_do_not_wait_behind_one_that_does():
    service = _FakeService("loading")
    n = server_mod._Namespace(service, "default")
    text_put: dict = {}
    waiter = threading.Thread(target=lambda: text_put.update(
        r=n.submit_blocking(n.puts, ("t", "some text", True))), daemon=True)
    waiter.start()
    ids_put: dict = {}
    quick = threading.Thread(target=lambda: ids_put.update(r=n.puts.submit(("ids", [1], True))),
                             daemon=True)
    quick.start()
    quick.join(timeout=10)
    assert ids_put == {"r": "ids"}  # answered while the model loads
    assert waiter.is_alive() and not text_put
    service.lm, service.model_state = object(), "ready"
    service.loaded.set()
    waiter.join(timeout=10)
    assert text_put == {"r": "t"}


def test_the_compactor_stays_off_sched_idle_where_it_could_not_come_back(monkeypatch):
    """An unprivileged process may leave SCHED_IDLE only as far as RLIMIT_NICE allows: without
    it the compactor would hold the write lock at idle priority, so it takes nice 19."""
    import resource

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (0, 0))
    assert not server_mod._may_leave_idle()
    monkeypatch.setattr(resource, "getrlimit", lambda which: (20, 20))
    assert server_mod._may_leave_idle()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert server_mod._may_leave_idle()


def test_a_batcher_survives_an_answer_that_fails():
    """A request whose answer cannot be delivered (its event loop closed) does not stop the
    batcher: the requests after it are answered."""
    batcher = server_mod.Batcher(lambda items: [x * 2 for x in items], name="test-batcher")

    def broken(key, value):
        raise RuntimeError("event loop is closed")

    batcher._enqueue(1, broken)
    assert batcher.submit(21) == 42
