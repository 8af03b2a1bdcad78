"""`seqkv store` with the real model: put/get byte for byte, stats --json, nearest --json."""

import json

import pytest
from typer.testing import CliRunner

from seqkv.cli import build_app

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
    st = json.loads(r.stdout)
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

    from seqkv.compress import prefill_cache
    from seqkv.delta import KVCache, load_cachefile, save_cachefile
    from tests.conftest import tiny_llama

    monkeypatch.setattr("seqkv.models.load_model", lambda model=None, **kw: llama)
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
