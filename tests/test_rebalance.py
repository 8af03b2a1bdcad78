"""The hot tiers from the user's side: `seqkv store rebalance` (--db, --server), the tier
fields of `store stats`, `seqkv serve --tier-budget` (POST /v1/rebalance, Client.rebalance,
auth and namespaces like every endpoint, and the background rebalance that sees the restores
the server served), and one-line refusals of bad budgets, policies and quantizers."""

import json
import time
import uuid

import pytest
from typer.testing import CliRunner

from seqkv.cli import build_app
from seqkv.client import Client, NotFound, ServerError
from seqkv.store import Store

from .test_cli_help import heavy_imports
from .test_server import lm, model_dir, raw, start  # noqa: F401 - fixtures
from .test_store_backends import CHUNK

runner = CliRunner()
app = build_app()
PROMPT = [3 + (7 * i) % 300 for i in range(24)]  # shared by the hot sessions: one edge
HOT = {f"hot{i}": PROMPT + [10 + i] + [50 + 3 * i + j for j in range(6)] for i in range(3)}
COLD = {f"cold{i}": [200 + i] + [100 + 5 * i + j for j in range(12)] for i in range(2)}
DATA = {**HOT, **COLD}
FIELDS = {"namespace", "budget", "policy", "quant", "kept", "added", "dropped", "bytes", "raw",
          "raw_added", "raw_dropped", "raw_swapped", "raw_skipped", "raw_bytes", "policy_bytes"}


def _coded(db: str, lm) -> None:  # noqa: F811 - the model, not the fixture
    s = Store(db, lm, chunk=CHUNK)
    for k, v in DATA.items():
        s.put(k, v)
    assert s.compact().pending == 0
    s.close()


def _exact(db: str, lm) -> dict:  # noqa: F811
    """Every session back exactly through a fresh Store; its stats."""
    with Store(db, lm) as fresh:
        assert fresh.sessions() == sorted(DATA)
        for k, v in DATA.items():
            assert fresh.get_ids(k) == v
        return fresh.stats()


def _cli(*args: str):
    return runner.invoke(app, ["store", "rebalance", *args])


def test_rebalance_cli_round_trip_on_sqlite(tmp_path, monkeypatch, llama):
    monkeypatch.setattr("seqkv.core.models.load_model", lambda model=None, **kw: llama)
    db = str(tmp_path / "s.db")
    _coded(db, llama)
    # the prior: 3 sessions pass through the prompt edge, so it is the edge kept raw
    budget = 4 * len(PROMPT)
    r = _cli("--db", db, "--budget", str(budget), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) == FIELDS
    assert (out["namespace"], out["budget"], out["policy"], out["quant"]) == (
        "default", budget, "prior", None)
    assert len(out["raw"]) == 1 and out["raw_swapped"] == 1 and out["kept"] == []
    assert out["raw_bytes"] == out["policy_bytes"] == budget
    st = _exact(db, llama)
    assert (st["raw_kept_edges"], st["raw_kept_bytes"]) == (1, budget)
    r = runner.invoke(app, ["store", "stats", "--db", db])  # the text form shows them too
    assert r.exit_code == 0 and f"raw_kept_bytes: {budget}" in r.output, r.output
    with Store(db, llama) as s:
        s.refresh()
        assert s.trie.sessions["hot0"].parent.id == out["raw"][0]  # = the prompt's node
        assert s.compact().kept_raw == 1  # compaction leaves it raw
    # room for a quantized checkpoint too: the human summary, the real bytes within budget
    with Store(db, llama, checkpoint_quant=("turboquant-mse", 4.0)) as s:
        # the prior keeps every edge raw first (a decode step saved per 4 bytes), then the
        # prompt's checkpoint (a branch point, 24 tokens deep)
        budget = s.checkpoint_size(len(PROMPT)) + 4 * s.stats()["tokens_unique"]
    r = _cli("--db", db, "--budget", str(budget), "--quant", "turboquant-mse:4")
    assert r.exit_code == 0, r.output
    assert "KV checkpoints" in r.output and "edges kept raw" in r.output
    assert "'default'" in r.output and "turboquant-mse:4" in r.output
    st = _exact(db, llama)
    assert st["checkpoints"] >= 1
    assert 0 < st["checkpoint_bytes"] + st["raw_kept_bytes"] <= budget
    with Store(db, llama) as s:  # a restore starts at the checkpoint
        assert s.get_cache("hot2").input_ids[0].tolist() == HOT["hot2"]
    # LRU admits the path of the session just restored: its edges are the hot ones
    path_tokens = len(HOT["hot1"])
    r = _cli("--db", db, "--budget", str(4 * path_tokens), "--policy", "lru", "--session",
             "hot1", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    with Store(db, llama) as s:
        s.refresh()
        path = sorted(n.id for n in s.trie.path(s.trie.sessions["hot1"]))
    assert out["policy"] == "lru" and out["raw"] == path and out["kept"] == []
    assert out["dropped"] and out["bytes"] == 0 and out["raw_bytes"] == 4 * path_tokens
    # no budget: every tier released, the next compaction codes everything again
    r = _cli("--db", db, "--budget", "0", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["raw"] == [] and out["kept"] == [] and out["policy_bytes"] == 0
    with Store(db, llama) as s:
        assert s.compact().pending == 0
    st = _exact(db, llama)
    assert (st["raw_edges"], st["raw_kept_edges"], st["checkpoints"]) == (0, 0, 0)


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("seqkv.core.models.load_model", refuse)


BAD = [
    (["--budget", "64MB"], "bad --budget '64MB'"),
    (["--budget", "-1"], "bad --budget '-1'"),
    (["--budget", "1.5"], "bad --budget"),
    ([], "needs --budget"),
    (["--budget", "100", "--policy", "mru"], "bad --policy 'mru'"),
    (["--budget", "100", "--quant", "nope:3"], "unknown quantizer 'nope'"),
    (["--budget", "100", "--quant", "int8:4"], "int8 stores 8 bits"),
    (["--budget", "100", "--quant", "turboquant-mse:x"], "positive number"),
    (["--budget", "100", "--quant", "turboquant-mse:-2"], "positive number"),
]


@pytest.mark.parametrize("args,message", BAD, ids=lambda a: " ".join(a) if isinstance(a, list)
                         else None)
def test_bad_arguments_are_refused_in_one_line_before_the_model(tmp_path, no_model, args,
                                                                message):
    db = tmp_path / "never.db"
    r = _cli("--db", str(db), *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert "Traceback" not in r.output and not db.exists()


def test_rebalance_refusals_that_are_not_usage_errors(tmp_path, monkeypatch, llama):
    r = _cli("--db", str(tmp_path / "never.db"), "--budget", "100")
    assert r.exit_code == 1 and "no seqkv store" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = _cli("--server", "http://127.0.0.1:9", "--budget", "100")
    assert r.exit_code == 2 and "--budget go(es) with --db" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = _cli("--server", "http://127.0.0.1:9")
    assert r.exit_code == 1 and "cannot reach" in r.output
    monkeypatch.setattr("seqkv.core.models.load_model", lambda model=None, **kw: llama)
    db = str(tmp_path / "s.db")
    Store(db, llama, chunk=CHUNK).put("a", [5, 6, 7])
    r = _cli("--db", db, "--budget", "100", "--policy", "lru", "--session", "zzz")
    assert r.exit_code == 1 and "no session 'zzz'" in r.output
    for args in (["--tier-budget", "lots"], ["--tier-policy", "mru"],
                 ["--tier-budget", "10", "--tier-quant", "fp9"], ["--tier-quant", "int8"]):
        r = runner.invoke(app, ["serve", "--db", db, "--port", "1", *args])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, (args, r.output)
        assert "--tier" in r.output and "Traceback" not in r.output


def test_rebalance_help_imports_nothing_heavy():
    heavy = ["torch", "transformers", "numpy", "safetensors", "fastapi", "uvicorn",
             "seqkv.store.store", "seqkv.server", "seqkv.core.models", "seqkv.quant"]
    assert heavy_imports(True, [["store", "rebalance"]], heavy) == []


def _put_all(c: Client) -> None:
    for k, v in DATA.items():
        c.put(k, ids=v)


def test_rebalance_endpoint_through_the_client_and_namespaces(tmp_path, start):  # noqa: F811
    keys = tmp_path / "keys.json"
    ka, kb = "key-a-" + uuid.uuid4().hex, "key-b-" + uuid.uuid4().hex
    keys.write_text(json.dumps({ka: "tenant-a", kb: "tenant-b"}))
    budget = 4 * len(PROMPT)
    # no background round during the test (an hour apart): the endpoint's answers are its own
    srv = start(str(tmp_path / "store.db"), "--keys", str(keys), "--compact-interval", "0",
                "--tier-budget", str(budget), "--tier-interval", "3600")
    a, b = Client(srv.url, ka), Client(srv.url, kb)
    _put_all(a)
    assert a.compact()["pending"] == 0
    for name in ("hot0", "hot1", "hot0"):
        assert a.get(name)["ids"] == DATA[name]
    out = a.rebalance()
    assert set(out) == FIELDS
    assert (out["namespace"], out["budget"], out["policy"], out["quant"]) == (
        "tenant-a", budget, "prior", None)
    assert len(out["raw"]) == 1 and out["raw_swapped"] == 1 and out["kept"] == []
    assert out["raw_bytes"] == out["policy_bytes"] == budget
    st = a.stats()
    assert (st["raw_kept_edges"], st["raw_kept_bytes"]) == (1, budget)
    assert a.compact()["kept_raw"] == 1  # the in-process compaction leaves it raw too
    # another key rebalances its own namespace only, and sees nothing of tenant-a
    other = b.rebalance()
    assert other["namespace"] == "tenant-b" and other["raw"] == [] == other["kept"]
    assert a.stats()["raw_kept_edges"] == 1
    with pytest.raises(NotFound):
        b.get("hot0")
    for key in (None, "wrong", ka + "x"):
        with pytest.raises(ServerError) as e:
            Client(srv.url, key or "").rebalance()
        assert e.value.status == 401
    status, body = raw(srv.url, "POST", "/v1/rebalance")
    assert status == 401 and set(body) == {"error"}
    for name, ids in DATA.items():  # every session back exactly
        assert a.get(name)["ids"] == ids
    # the CLI over --server, and the endpoint in the OpenAPI description
    r = runner.invoke(app, ["store", "rebalance", "--server", srv.url, "--api-key", ka,
                            "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["raw"] == out["raw"]
    r = runner.invoke(app, ["store", "rebalance", "--server", srv.url, "--api-key", ka])
    assert r.exit_code == 0 and "tenant-a" in r.output, r.output
    status, spec = raw(srv.url, "GET", "/openapi.json")
    assert status == 200 and "/v1/rebalance" in spec["paths"]
    assert "RebalanceResult" in spec["components"]["schemas"]
    health = a.health()
    assert (health["tiers"], health["rebalances"]) == ("on", 0)
    # a server without --tier-budget keeps no hot tiers: refused, in one JSON line
    plain = start(str(tmp_path / "plain.db"), "--compact-interval", "0")
    with pytest.raises(ServerError) as e:
        Client(plain.url).rebalance()
    assert e.value.status == 400 and "--tier-budget" in str(e.value)
    assert Client(plain.url).health()["tiers"] == "off"


def test_the_background_rebalance_sees_the_restores_the_server_served(tmp_path, start):  # noqa: F811, E501
    """LRU keeps raw only the path of a session that was restored: the edges kept raw appear
    once a restore was served, without any call to /v1/rebalance (the background round runs
    in the server, where restores are counted)."""
    path_tokens = len(HOT["hot0"])  # the prompt edge and hot0's own
    srv = start(str(tmp_path / "store.db"), "--compact-interval", "0.2", "--tier-budget",
                str(4 * path_tokens), "--tier-policy", "lru", "--tier-interval", "0.3")
    c = Client(srv.url)
    _put_all(c)
    deadline = time.monotonic() + 180  # a loaded 2-core machine: slow, not wrong
    while c.stats()["raw_edges"]:  # coded by the compactor; LRU keeps nothing unrestored
        assert time.monotonic() < deadline, "background compaction did not run"
        time.sleep(0.2)
    assert c.stats()["raw_kept_edges"] == 0
    assert c.get("hot0")["ids"] == HOT["hot0"]
    while c.stats()["raw_kept_edges"] < 2:
        assert time.monotonic() < deadline, "no background rebalance after a restore"
        time.sleep(0.2)
    st = c.stats()
    assert (st["raw_kept_edges"], st["raw_kept_bytes"]) == (2, 4 * path_tokens)
    seen = Store(str(tmp_path / "store.db"))  # another process: the restore is in the store
    seen.refresh()
    assert "hot0" in seen.backend.snapshot(seen.ns, ("hits",))[1]["hits"]
    time.sleep(1)  # several more rounds: the compactor leaves the kept edges raw
    st = c.stats()
    assert (st["raw_edges"], st["raw_kept_edges"]) == (2, 2)
    for name, ids in DATA.items():
        assert c.get(name)["ids"] == ids
    assert c.health()["rebalances"] >= 1


class _SlowTierStore:
    """A Store whose rebalance takes as long as the test wants; puts and reads are instant."""

    def __init__(self, gate) -> None:
        self.lm, self.gate = object(), gate
        self.checkpoints = type("C", (), {"absorb": lambda self, other: None})()

    def put_many(self, items):
        return [session for session, _, _ in items]

    def get_many(self, sessions, use_checkpoint=False):
        return [[5, 6] for _ in sessions]

    def is_text(self, session):
        return False

    def rebalance(self, accessed):
        assert self.gate.wait(30)
        return {"accessed": accessed}


class _Service:
    def __init__(self, gate) -> None:
        self.lm, self.model_state, self.gate = object(), "ready", gate
        self.restores_seen: list[int] = []

    def open_store(self, ns, wait=True):
        return _SlowTierStore(self.gate)

    def model(self):
        return self.lm

    def restored(self, restores):
        self.restores_seen.append(restores)


def test_a_rebalance_in_progress_holds_up_no_put_and_no_read():
    """The rebalance has its own Store and lock: while one runs (its model work), puts and
    reads of the namespace are answered; the restores they served are its cues."""
    import threading

    from seqkv import server as server_mod

    gate = threading.Event()
    service = _Service(gate)
    n = server_mod._Namespace(service, "ns")
    done: dict = {}
    t = threading.Thread(target=lambda: done.update(r=n.rebalance()), daemon=True)
    t.start()
    time.sleep(0.1)
    assert t.is_alive() and not n.dirty  # running
    assert n.puts.submit(("s", [5, 6], True)) == "s"
    assert n.gets.submit(("s", False)) == ([5, 6], None)
    assert n.dirty and n.restores == 1 and n.last_restored == "s"
    assert service.restores_seen == [1]
    gate.set()
    t.join(10)
    assert done == {"r": {"accessed": None}}
    assert n.rebalance() == {"accessed": "s"}  # LRU's cue: the latest restore
    assert not n.dirty and n.restores == 0


def test_a_server_read_counts_one_restore_for_the_policy(tmp_path, lm):  # noqa: F811
    """The reader's batched read of a text session, and a KV cache read after it, count one
    restore each at the session's node (the text was restored again, and the cache read's
    second look counted again: the tier policy saw reuse that did not happen)."""
    from seqkv.server import _get_many

    db = str(tmp_path / "hits.db")
    writer = Store(db, lm)
    writer.put("t", "hello world, this is a text session")
    writer.put("i", [5, 6, 7, 8, 9])
    reader = Store(db, lm)
    got = _get_many(reader, [("t", False), ("i", False)])  # what one GET of each does
    assert got[0][1] == "hello world, this is a text session" and got[1] == ([5, 6, 7, 8, 9],
                                                                              None)
    reader.get_cache("t", count=False)  # the /cache route's prefill after its batched read
    for name in ("t", "i"):
        assert reader.checkpoints.restores[name][0] == 1
        assert reader.checkpoints.node_hits()[reader.trie.sessions[name].id][0] == 1
