"""The CLI contract other tools script against, and its one-line errors."""

import json
import subprocess
import sys

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from seqkv.cli import build_app

runner = CliRunner()
app = build_app()
TEXT = "The jury praised the city for the manner in which the election was conducted.\n"


@pytest.fixture(scope="module")
def blob_path(tmp_path_factory, smollm2):
    d = tmp_path_factory.mktemp("cli")
    (d / "in.txt").write_text(TEXT)
    result = runner.invoke(app, ["compress", str(d / "in.txt"), "-o", str(d / "in.skv"), "-q"])
    assert result.exit_code == 0, result.output
    return d / "in.skv"


def test_decompress_byte_for_byte(blob_path, tmp_path):
    out = tmp_path / "out.txt"
    result = runner.invoke(app, ["decompress", str(blob_path), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == TEXT.encode()


def test_inspect_json_contract(blob_path):
    result = runner.invoke(app, ["inspect", str(blob_path), "--json"])
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    for key in ("tokens", "bits", "bits_per_token", "model", "fp16_kv_bits", "turboquant3_kv_bits"):
        assert key in info
    assert info["bits_per_token"] == pytest.approx(info["bits"] / info["tokens"])
    assert info["fp16_kv_bits"] > info["turboquant3_kv_bits"] > info["bits"]


def _every_command(group=None, path=()):
    """Every command and group of the app, as the argument lists that reach it."""
    group = group or get_command(app)
    yield list(path), group
    for name, cmd in getattr(group, "commands", {}).items():
        yield from _every_command(cmd, (*path, name)) if hasattr(cmd, "commands") else [
            ([*path, name], cmd)]


@pytest.mark.parametrize("command", [c for c, _ in _every_command()], ids=" ".join)
def test_help_everywhere(command):
    """Each --help names its command in the usage line, says what it does, and lists its
    subcommands or every option by its flag."""
    cmd = dict((tuple(c), x) for c, x in _every_command())[tuple(command)]
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.replace("│", " ").split())
    assert f"Usage: seqkv {' '.join(command)}".rstrip() in out
    assert " ".join(cmd.help.split("\n\n")[0].split()) in out  # the summary, unwrapped
    for name in getattr(cmd, "commands", {}):
        assert name in out
    for param in cmd.params:
        if param.param_type_name == "option":
            assert param.opts[0] in out, (command, param.opts)


def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "seqkv", *args], capture_output=True, text=True,
                          **kw)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "no such file"),
        (lambda d: (d / "x.skv").write_bytes(b""), "empty blob"),
        (lambda d: (d / "x.skv").write_bytes(b"GIF89a not ours"), "not a seqkv blob"),
    ],
)
def test_bad_blob_is_one_line_exit_1(tmp_path, make, message):
    make(tmp_path)
    proc = _run("decompress", str(tmp_path / "x.skv"), "-o", str(tmp_path / "o.txt"))
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o.txt").exists()


def test_truncated_blob_one_line(blob_path, tmp_path):
    cut = tmp_path / "cut.skv"
    cut.write_bytes(blob_path.read_bytes()[:-7])
    proc = _run("inspect", str(cut), "--json")
    assert proc.returncode == 1 and "truncated" in proc.stderr and "Traceback" not in proc.stderr


def test_empty_text_and_bad_paths(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    proc = _run("compress", str(tmp_path / "empty.txt"), "-o", str(tmp_path / "e.skv"))
    assert proc.returncode == 1 and "empty text" in proc.stderr
    (tmp_path / "t.txt").write_text("hi")
    proc = _run("compress", str(tmp_path / "t.txt"), "-o", str(tmp_path / "no" / "e.skv"))
    assert proc.returncode == 1 and "no such directory" in proc.stderr
    proc = _run("compress", str(tmp_path / "t.txt"), "-o", "x", "--model", str(tmp_path / "nope"))
    assert proc.returncode == 1 and "model path does not exist" in proc.stderr


def test_wrong_model_refused(blob_path, tmp_path):
    """A blob decoded under another model: one line, exit 1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from seqkv.core.models import default_model_dir

    config = LlamaConfig.from_pretrained(default_model_dir())
    config.num_hidden_layers = 1
    model_dir = tmp_path / "other"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    for f in default_model_dir().glob("tokenizer*"):
        (model_dir / f.name).write_bytes(f.read_bytes())
    proc = _run("decompress", str(blob_path), "-o", str(tmp_path / "o.txt"), "--model",
                str(model_dir))
    assert proc.returncode == 1 and "blob was written with model" in proc.stderr
