"""`seqkv store`: put/get byte for byte, stats --json, nearest --json, compact (the real
model in the slow test), and first impressions: reading commands never create a store, a bad
--db is refused before the model loads, delete needs no model, put's figures say what they
count, and help imports no torch."""

import json

import pytest
from typer.testing import CliRunner

from seqkv.cli import build_app

from .test_cli_help import heavy_imports
from .test_server import TEXT_A, TEXT_B, lm, model_dir  # noqa: F401 - fixtures

runner = CliRunner()

app = build_app()
SYSTEM = "You are a careful assistant. Answer briefly and cite the manual.\n"
A = SYSTEM + "User: How do I open a file in Python?\n"
B = SYSTEM + "User: What does  the  `with` statement do?\u00a0\n"


@pytest.mark.slow
def test_store_cli_contract(tmp_path, smollm2):
    db = str(tmp_path / "s.db")
    for name, text in (("a", A), ("b", B)):
        (tmp_path / f"{name}.txt").write_text(text)
        r = runner.invoke(app, ["store", "put", "--db", db, "--session", name,
                                str(tmp_path / f"{name}.txt")])
        assert r.exit_code == 0, r.output
    for name, text in (("a", A), ("b", B)):
        out = tmp_path / f"{name}.out"
        r = runner.invoke(app, ["store", "get", "--db", db, "--session", name, "-o", str(out)])
        assert r.exit_code == 0, r.output
        assert out.read_bytes() == text.encode()
    r = runner.invoke(app, ["store", "stats", "--db", db, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["raw_edges"] > 0  # durable, coded by the next compaction
    r = runner.invoke(app, ["store", "compact", "--db", db, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["pending"] == 0, r.output
    r = runner.invoke(app, ["store", "stats", "--db", db, "--json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)
    assert st["raw_edges"] == 0
    tok = smollm2.tokenizer
    shared = len(tok(SYSTEM + "User:").input_ids) - 1
    assert st["sessions"] == 2
    assert st["tokens_total"] == len(tok(A).input_ids) + len(tok(B).input_ids)
    assert st["tokens_unique"] <= st["tokens_total"] - shared
    assert 0 < st["bits_total"] < 16 * st["tokens_unique"]  # under a plain 16-bit token id
    (tmp_path / "q.txt").write_text(SYSTEM + "User: How do I close a file?")
    r = runner.invoke(app, ["store", "nearest", "--db", db, str(tmp_path / "q.txt"), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert rows[0]["session"] == "a" and rows[0]["shared_tokens"] > rows[1]["shared_tokens"]
    assert rows[1]["shared_tokens"] >= shared and rows[0]["d_T_bits"] > rows[1]["d_T_bits"] > 0
    r = runner.invoke(app, ["store", "get", "--db", db, "--session", "zzz", "-o",
                            str(tmp_path / "z")])
    assert r.exit_code == 1 and "no session 'zzz'" in r.output


def test_store_exact_tier_cli(tmp_path, monkeypatch, llama):
    """put --exact CACHE.safetensors, get --exact: the file comes back bit for bit."""
    import torch

    from seqkv.core.cache import KVCache, load_cachefile, prefill_cache, save_cachefile
    from tests.conftest import tiny_llama

    monkeypatch.setattr("seqkv.core.models.load_model", lambda model=None, **kw: llama)
    other = tiny_llama()
    other.model.to(torch.bfloat16)
    ids = list(range(5, 40))
    kv = KVCache.from_dynamic(prefill_cache(other.model, ids).cache, ids)
    cache, out, db = tmp_path / "c.safetensors", tmp_path / "o.safetensors", str(tmp_path / "d")
    save_cachefile(cache, kv)
    r = runner.invoke(app, ["store", "put", "--db", db, "--session", "x", "--exact",
                            str(cache), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["exact_bytes"] > 0
    r = runner.invoke(app, ["store", "get", "--db", db, "--session", "x", "--exact",
                            "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert load_cachefile(out).equal_bits(kv)
    r = runner.invoke(app, ["store", "put", "--db", db, "--session", "y", "--exact",
                            str(tmp_path / "missing.safetensors")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("seqkv.core.models.load_model", refuse)


READING = [["stats"], ["get", "--session", "a", "-o", "OUT"], ["nearest", "PROMPT"],
           ["delete", "--session", "a"], ["compact"]]


def _args(cmd, tmp_path):
    (tmp_path / "prompt.txt").write_text("hello")
    return [str(tmp_path / "out.txt") if a == "OUT" else
            str(tmp_path / "prompt.txt") if a == "PROMPT" else a for a in cmd]


@pytest.mark.parametrize("cmd", READING, ids=lambda c: c[0])
def test_reading_commands_never_create_a_store(tmp_path, no_model, cmd):
    db = tmp_path / "never_created.db"
    r = runner.invoke(app, ["store", *_args(cmd, tmp_path), "--db", str(db)])
    assert r.exit_code == 1 and "no seqkv store" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not db.exists() and not (tmp_path / "never_created.db-wal").exists()


@pytest.mark.parametrize("cmd", [["put", "--session", "a", "PROMPT"]] + READING,
                         ids=lambda c: c[0])
def test_a_db_that_is_not_a_store_is_refused_before_the_model_loads(tmp_path, no_model, cmd):
    for content in (b"hello, not a database\n", b"SQLite format 3\x00" + b"\x00" * 200):
        bad = tmp_path / "notes.txt"
        bad.write_bytes(content)
        r = runner.invoke(app, ["store", *_args(cmd, tmp_path), "--db", str(bad)])
        assert r.exit_code == 1 and "not a seqkv store" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
        assert bad.read_bytes() == content  # untouched
    r = runner.invoke(app, ["store", *_args(cmd, tmp_path), "--db", str(tmp_path)])
    assert r.exit_code == 1 and "directory" in r.output


def test_delete_and_stats_need_no_model(tmp_path, llama, no_model):
    from seqkv.store import Store

    db = str(tmp_path / "s.db")
    Store(db, llama).put("a", [5, 6, 7])
    r = runner.invoke(app, ["store", "delete", "--db", db, "--session", "a"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["store", "stats", "--db", db, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["sessions"] == 0, r.output
    r = runner.invoke(app, ["store", "delete", "--db", db, "--session", "a"])
    assert r.exit_code == 1 and "no session 'a'" in r.output


def test_db_and_server_are_exclusive(tmp_path, no_model):
    for extra in ([], ["--db", str(tmp_path / "x.db"), "--server", "http://127.0.0.1:9"]):
        r = runner.invoke(app, ["store", "stats", *extra])
        assert r.exit_code == 1 and "exactly one of --db and --server" in r.output


def test_put_reports_what_each_figure_counts(tmp_path, monkeypatch, lm):  # noqa: F811
    """Two texts sharing a prefix: the second's figures add up, name the split, and nothing
    counts the re-coding of the split edge as new."""
    monkeypatch.setattr("seqkv.core.models.load_model", lambda model=None, **kw: lm)
    db = str(tmp_path / "s.db")
    (tmp_path / "a.txt").write_text(TEXT_A)
    (tmp_path / "b.txt").write_text(TEXT_B)
    r = runner.invoke(app, ["store", "put", "--db", db, "--session", "a", str(tmp_path / "a.txt"),
                            "--json"])
    assert r.exit_code == 0, r.output
    a = json.loads(r.stdout)
    assert (a["shared_tokens"], a["new_tokens"], a["split_edges"]) == (0, a["tokens"], 0)
    r = runner.invoke(app, ["store", "put", "--db", db, "--session", "b", str(tmp_path / "b.txt")])
    assert r.exit_code == 0, r.output
    n_b = len(lm.tokenizer(TEXT_B).input_ids)
    ids_a, ids_b = lm.tokenizer(TEXT_A).input_ids, lm.tokenizer(TEXT_B).input_ids
    shared = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y)
    assert (f"b: {n_b} tokens = {shared} shared with stored sessions (stored once) + "
            f"{n_b - shared} new (written raw") in r.output
    assert "1 stored edge(s) split" in r.output


def test_store_help_and_client_import_no_torch():
    """The store commands' help (and seqkv.client) import nothing heavy. seqkv/__init__.py,
    which imports seqkv.compress for the library API, is left out, as tests/test_cli_help.py
    does: what is measured is the store CLI's own imports."""
    commands = [["store"], ["serve"]] + [["store", c] for c in
                                         ("put", "get", "delete", "stats", "nearest", "compact")]
    heavy = ["torch", "transformers", "numpy", "safetensors", "fastapi", "uvicorn",
             "seqkv.store.store", "seqkv.server", "seqkv.core.models"]
    assert heavy_imports(True, commands, heavy, also=("seqkv.client",)) == []
