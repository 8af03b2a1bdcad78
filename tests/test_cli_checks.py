"""Bad input is refused before any model loads; the time estimate comes before the
work."""

import pytest
from typer.testing import CliRunner

import seqkv
import seqkv.core.models
from seqkv.cli import build_app
from seqkv.cli import codec as codec_cli
from seqkv.cli.common import coding_seconds
from seqkv.core.errors import SeqkvError

runner = CliRunner()
app = build_app()


@pytest.fixture()
def no_model(monkeypatch):
    """Any attempt to load a model fails the test (its message would show in the output)."""

    def refuse(*args, **kwargs):
        raise AssertionError("MODEL LOADED")

    monkeypatch.setattr(seqkv.core.models, "load_model", refuse)


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    out = result.output.strip()
    assert out.startswith("seqkv: error:") and "\n" not in out, out
    assert "MODEL LOADED" not in out and "Traceback" not in out
    for needle in needles:
        assert needle in out, out
    return out


@pytest.fixture()
def texts(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "t.txt").write_text("The jury praised the city.\n")
    (tmp_path / "adir").mkdir()
    return tmp_path


@pytest.mark.parametrize("command", ["compress", "kv-dump"])
def test_bad_text_or_output_refused_before_the_model(no_model, texts, command):
    d = texts
    cases = [
        ([str(d / "empty.txt"), "-o", str(d / "o")], ["empty text"]),
        ([str(d / "latin1.txt"), "-o", str(d / "o")], ["not UTF-8", "byte 3"]),
        ([str(d / "missing.txt"), "-o", str(d / "o")], ["no such file"]),
        ([str(d / "t.txt"), "-o", str(d / "nofolder" / "o")], ["no such directory"]),
        ([str(d / "t.txt"), "-o", str(d / "adir")], [f"is a directory: {d / 'adir'}"]),
    ]
    for args, needles in cases:
        out = _one_line_error(runner.invoke(app, [command, *args]), *needles)
        assert ".tmp" not in out
    assert sorted(p.name for p in d.iterdir()) == ["adir", "empty.txt", "latin1.txt", "t.txt"]


def test_bad_chunking_refused_before_the_model(no_model, texts):
    r = runner.invoke(app, ["compress", str(texts / "t.txt"), "-o", str(texts / "o"),
                            "--batch", "0"])
    _one_line_error(r, "--batch")


@pytest.fixture(scope="module")
def foreign_text_blob(tmp_path_factory):
    """A text blob written under a tiny random model that has SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(seqkv.core.models.default_model_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    lm = seqkv.from_objects(LlamaForCausalLM(config), tokenizer, "tiny-text-0")
    path = tmp_path_factory.mktemp("foreign") / "t.skv"
    path.write_bytes(seqkv.compress_text(lm, "Hello there."))
    return path


@pytest.mark.parametrize("model", [None, "smollm2-135m", "gemma3-270m", "default"])
def test_blob_of_another_model_refused_before_loading(no_model, foreign_text_blob, tmp_path,
                                                      model):
    args = ["decompress", str(foreign_text_blob), "-o", str(tmp_path / "o.txt")]
    if model:
        args += ["--model", model]
    needed = "smollm2-135m" if model in (None, "default") else model
    # Compact blobs name a model by its engine weights (packaged models by name).
    _one_line_error(runner.invoke(app, args), "engine weights", f"not '{needed}'", "--model")
    assert not (tmp_path / "o.txt").exists()


def test_output_checked_before_loading_for_decompress(no_model, foreign_text_blob, tmp_path):
    r = runner.invoke(app, ["decompress", str(foreign_text_blob), "-o", str(tmp_path / "no" / "o"),
                            "--model", str(tmp_path)])
    _one_line_error(r, "no such directory")


def test_unreadable_header_is_one_line(no_model, foreign_text_blob, tmp_path, monkeypatch):
    """inspect_blob failing on a header it does not know: still one line, exit 1."""

    def broken(blob):
        raise KeyError("numerics")

    monkeypatch.setattr("seqkv.tokens.json_blob.describe", broken)
    monkeypatch.setattr("seqkv.tokens.compact.describe", broken)  # compact blobs: no torch
    for command in (["decompress", "-o", str(tmp_path / "o")], ["inspect"], ["kv-restore", "-o",
                                                                             str(tmp_path / "o")]):
        r = runner.invoke(app, [command[0], str(foreign_text_blob), *command[1:]])
        _one_line_error(r, str(foreign_text_blob), "unreadable blob header", "KeyError")


def test_token_ids_blob_is_not_text(no_model, llama, tmp_path):
    blob = tmp_path / "ids.skv"
    blob.write_bytes(seqkv.compress_tokens(llama, list(range(5, 20))))
    r = runner.invoke(app, ["decompress", str(blob), "-o", str(tmp_path / "o")])
    _one_line_error(r, "token ids, not text")


# --- the estimate before the work -----------------------------------------------------------

def test_estimate_matches_the_measured_rates():
    assert coding_seconds(1_000, 2048, 16) == pytest.approx(50, rel=0.01)  # one stream, 20 tok/s
    # a 3 MB text, ~630k tokens, coded at ~88 tokens/s in 16 streams: about 2 hours
    assert 1.7 * 3600 < coding_seconds(630_000, 2048, 16) < 2.3 * 3600
    # six 256-token chunks in lockstep: measured ~65 tokens/s
    assert 40 < 1536 / coding_seconds(1536, 256, 16) < 70
    assert coding_seconds(630_000, 2048, 1024, "cuda") == pytest.approx(2048 / 22)  # one group
    assert coding_seconds(0, 2048, 16) == 0


def _stop(*args, **kwargs):
    raise SeqkvError("stopped before coding")


@pytest.mark.parametrize("size, quiet, noted", [(20_000, False, True), (200, False, False),
                                                (20_000, True, False)])
def test_long_text_gets_an_estimate_before_coding(tmp_path, monkeypatch, llama, size, quiet,
                                                  noted):
    monkeypatch.setattr(codec_cli, "load", lambda model, needed=None: llama)  # no tokenizer
    monkeypatch.setattr("seqkv.tokens.api.compress_text", _stop)
    (tmp_path / "t.txt").write_text("a" * size)
    args = ["compress", str(tmp_path / "t.txt"), "-o", str(tmp_path / "o")]
    r = runner.invoke(app, args + (["-q"] if quiet else []))
    lines = r.output.strip().splitlines()
    assert lines[-1] == "seqkv: error: stopped before coding"
    if noted:
        assert len(lines) == 2 and lines[0].startswith("seqkv: note: coding 20,008 tokens")
        assert "estimate" in lines[0] and "--batch" in lines[0] and "--chunk-size" in lines[0]
        assert "GPU" in lines[0]
    else:
        assert len(lines) == 1


def test_compact_blob_refusal_imports_no_torch(foreign_text_blob, tmp_path):
    """A compact blob's header is read without torch, so its refusal comes at once."""
    import subprocess
    import sys

    script = (
        "import sys\nfrom seqkv.cli import build_app\n"
        "try:\n    build_app()(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, "decompress", str(foreign_text_blob),
                          "-o", str(tmp_path / "o.txt")], capture_output=True, text=True,
                         timeout=120)
    assert "engine weights" in out.stderr and out.stderr.strip().endswith("False"), out.stderr


def test_blob_of_an_earlier_engine_refused_by_name_before_the_model(no_model, tmp_path):
    """Engine 2's golden blob (keys and values at full Q12 precision): one line naming both
    versions, no model loaded, nothing written; inspect still describes it."""
    from pathlib import Path

    from seqkv.core.version import ENGINE_ID

    old = Path(__file__).parent / "golden" / "smollm2_news_engine2.skv"
    out = tmp_path / "o.txt"
    _one_line_error(runner.invoke(app, ["decompress", str(old), "-o", str(out)]),
                    "integer engine version 2", f"has version {ENGINE_ID}")
    assert not out.exists()
    result = runner.invoke(app, ["inspect", str(old), "--json"])
    assert result.exit_code == 0 and '"smollm2-135m"' in result.output
