"""kv-dump / kv-compress / kv-restore: the CLI contract and its one-line errors."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from seqkv.cli import build_app
from seqkv.cli import kv as kv_cli
from seqkv.core.blob import read_blob
from seqkv.core.cache import KVCache, load_cachefile, prefill_cache, save_cachefile
from seqkv.delta import inspect_delta_blob
from tests.conftest import tiny_llama

runner = CliRunner()
app = build_app()
IDS = list(range(5, 30))


@pytest.fixture()
def tiny(monkeypatch, llama):
    monkeypatch.setattr(kv_cli, "load", lambda model, needed=None: llama)
    return llama


@pytest.fixture()
def cachefile(tmp_path):
    other = tiny_llama()
    other.model.to(torch.bfloat16)  # "computed elsewhere"
    path = tmp_path / "cache.safetensors"
    save_cachefile(path, KVCache.from_dynamic(prefill_cache(other.model, IDS).cache, IDS))
    return path


def _equal_files(a, b) -> bool:
    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape
        and ta[k].contiguous().view(torch.uint8).equal(tb[k].contiguous().view(torch.uint8))
        for k in ta)


@pytest.mark.parametrize("predictor,extra", [
    ("recompute", []), ("none", []), ("neighbour", []),
    ("recompute", ["--predictor-dtype", "bf16", "--predictor-attn", "sdpa"]),
    ("quantized", ["--copy-quantizer", "turboquant-mse", "--copy-bits", "4"])])
def test_compress_restore_exact(tiny, cachefile, tmp_path, predictor, extra):
    skv, out = tmp_path / "c.skv", tmp_path / "out.safetensors"
    r = runner.invoke(app, ["kv-compress", str(cachefile), "-o", str(skv), "--exact",
                            "--predictor", predictor, "--tokens", "raw", *extra])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["kv-restore", str(skv), "-o", str(out), "--exact"])
    assert r.exit_code == 0, r.output
    assert _equal_files(cachefile, out)
    info = inspect_delta_blob(read_blob(skv))
    assert info["mode"] == "exact" and info["predictor"]["name"] == predictor


def test_lossy_then_exact_restore_refused(tiny, cachefile, tmp_path):
    skv = tmp_path / "c.skv"
    r = runner.invoke(app, ["kv-compress", str(cachefile), "-o", str(skv), "-q",
                            "--max-abs-error", "0.01"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["kv-restore", str(skv), "-o", str(tmp_path / "o.st"), "--exact"])
    assert r.exit_code == 1 and "lossy" in r.output and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["kv-restore", str(skv), "-o", str(tmp_path / "o.st")])
    assert r.exit_code == 0, r.output
    a, b = load_cachefile(cachefile), load_cachefile(tmp_path / "o.st")
    assert all(((x.float() - y.float()).abs() <= 0.01).all() for x, y in
               zip(a.tensors, b.tensors, strict=True))


def test_rel_mse_mode(tiny, cachefile, tmp_path):
    skv, out = tmp_path / "c.skv", tmp_path / "o.st"
    r = runner.invoke(app, ["kv-compress", str(cachefile), "-o", str(skv), "-q",
                            "--rel-mse", "0.001"])
    assert r.exit_code == 0, r.output
    assert inspect_delta_blob(read_blob(skv))["lossy"]["rel_mse"] == 0.001
    assert runner.invoke(app, ["kv-restore", str(skv), "-o", str(out)]).exit_code == 0
    for x, y in zip(load_cachefile(cachefile).tensors, load_cachefile(out).tensors, strict=True):
        assert float((y.double() - x.double()).pow(2).sum()) <= 1e-3 * float(
            x.double().pow(2).sum())


def test_summary_says_what_each_number_counts(tiny, cachefile, tmp_path):
    """The token part's bits/token is the coded stream's, not the inner blob's
    header included; that header is reported as bytes."""
    from seqkv import inspect_blob
    from seqkv.delta.api import parse

    skv = tmp_path / "c.skv"
    r = runner.invoke(app, ["kv-compress", str(cachefile), "-o", str(skv), "--exact"])
    assert r.exit_code == 0, r.output
    line = r.output.strip().splitlines()[-1]
    blob = read_blob(skv)
    info, inner = inspect_delta_blob(blob), parse(blob)[1]["tokens"]
    coded = inspect_blob(inner)["bits_per_token"]
    assert coded < info["tokens_part"]["bits_per_token"]  # the header is not counted in
    assert (f"tokens coded at {coded:.2f} bits/token ({len(inner):,} bytes with their blob's "
            "header)") in line
    assert line.startswith(f"{len(IDS)} tokens, {info['components']:,} components -> "
                           f"{len(blob):,} bytes, {info['ratio']:.2f}x smaller")
    r = runner.invoke(app, ["kv-compress", str(cachefile), "-o", str(skv), "--tokens", "raw"])
    assert f"tokens stored raw ({4 * len(IDS)} bytes)" in r.output


def test_restore_refuses_a_blob_of_another_model_before_loading(tiny, cachefile, tmp_path,
                                                                monkeypatch):
    skv = tmp_path / "c.skv"
    r = runner.invoke(app, ["kv-compress", str(cachefile), "-o", str(skv), "-q"])
    assert r.exit_code == 0, r.output
    monkeypatch.undo()  # the real load: a packaged model would be loaded, but is refused first
    monkeypatch.setattr("seqkv.core.models.load_model", lambda *a, **k: pytest.fail("model loaded"))
    r = runner.invoke(app, ["kv-restore", str(skv), "-o", str(tmp_path / "o.st")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "written with model 'tiny-llama-0', not 'smollm2-135m'" in r.output
    r = runner.invoke(app, ["kv-restore", str(cachefile), "-o", str(tmp_path / "o.st")])
    assert r.exit_code == 1 and "not a seqkv blob" in r.output


def test_errors_are_one_line(tiny, cachefile, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    noids = tmp_path / "noids.safetensors"
    save_file({"layers.0.keys": torch.zeros(1, 1, 2, 4)}, noids)
    cases = [
        ["kv-compress", str(tmp_path / "missing"), "-o", str(tmp_path / "x")],
        ["kv-compress", str(bad), "-o", str(tmp_path / "x")],
        ["kv-compress", str(noids), "-o", str(tmp_path / "x")],
        ["kv-compress", str(cachefile), "-o", str(tmp_path / "x"), "--predictor", "oracle"],
        ["kv-compress", str(cachefile), "-o", str(tmp_path / "x"), "--exact",
         "--max-abs-error", "0.1"],
        ["kv-compress", str(cachefile), "-o", str(tmp_path / "x"), "--rel-mse", "0.1",
         "--max-abs-error", "0.1"],
        ["kv-compress", str(cachefile), "-o", str(tmp_path / "x"), "--predictor-dtype", "int4"],
        ["kv-compress", str(cachefile), "-o", str(tmp_path / "x"), "--predictor", "neighbour",
         "--rel-mse", "0.1"],
        ["kv-compress", str(cachefile), "-o", str(tmp_path / "x"), "--predictor", "quantized",
         "--copy-quantizer", "nope"],
        ["kv-restore", str(cachefile), "-o", str(tmp_path / "x")],
    ]
    for args in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 1, (args, r.output)
        assert r.output.startswith("seqkv: error:") and len(r.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_kv_dump_real_model(smollm2, tmp_path):
    txt = tmp_path / "in.txt"
    txt.write_text("The jury praised the city for the manner of the election.\n")
    st, skv, out = (tmp_path / n for n in ("c.safetensors", "c.skv", "o.safetensors"))
    r = runner.invoke(app, ["kv-dump", str(txt), "-o", str(st), "--dtype", "bf16"])
    assert r.exit_code == 0, r.output
    kv = load_cachefile(st)
    assert len(kv.keys) == 30 and kv.keys[0].dtype == torch.bfloat16
    assert kv.keys[0].shape == (1, 3, kv.n_tokens, 64)
    r = runner.invoke(app, ["kv-compress", str(st), "-o", str(skv), "--exact", "-q",
                            "--tokens", "raw"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["kv-restore", str(skv), "-o", str(out), "--exact"])
    assert r.exit_code == 0, r.output
    assert _equal_files(st, out)
