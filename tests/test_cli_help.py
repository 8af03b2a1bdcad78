"""`--help` of every command: fast (no torch), flags shown as flags, every option explained."""

import json
import re
import subprocess
import sys

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from seqkv.cli import build_app

runner = CliRunner()
app = build_app()
# The commands this module covers (the store's are checked in tests/test_store_cli.py).
COMMANDS = ["compress", "decompress", "inspect", "demo", "quantizers", "kv-dump", "kv-compress",
            "kv-restore"]
HEAVY = ["torch", "transformers", "numpy", "safetensors", "seqkv.tokens.api", "seqkv.core.models",
         "seqkv.delta", "seqkv.tokens.codec"]


def _words(text: str) -> str:
    """Help text with the box drawing and line wrapping taken out."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_every_option_and_shows_flags_as_flags(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = _words(result.output)
    assert "<bool>" not in out
    usage = next(line for line in result.output.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage
    cmd = get_command(app).commands[command]
    for param in cmd.params:
        if param.param_type_name == "option":
            assert param.help, f"{command} {param.opts} has no help text"
        if param.help:
            assert _words(param.help) in out, (command, param.opts)


def test_usage_line_names_the_argument():
    result = runner.invoke(app, ["decompress", "--help"], env={"COLUMNS": "200"})
    usage = next(line for line in result.output.splitlines() if "Usage:" in line)
    assert usage.split()[-3:] == ["decompress", "[OPTIONS]", "INPUT"]


def test_top_level_help_has_no_bool():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "<bool>" not in result.output
    for command in COMMANDS:
        assert command in result.output


def test_defaults_repeated_for_fast_help_match_the_codec():
    from seqkv.cli import codec
    from seqkv.tokens.codec import DEFAULT_BATCH, DEFAULT_CHUNK

    assert (codec.DEFAULT_CHUNK, codec.DEFAULT_BATCH) == (DEFAULT_CHUNK, DEFAULT_BATCH)


# Runs `seqkv ARGS --help` for each ARGS in a fresh interpreter (then imports ``also``) and
# lists the heavy modules it imported. skip_init leaves seqkv/__init__.py out, to measure the
# CLI's own imports apart from the package's (lazy) entry points.
_PROBE = """
import importlib.util, json, sys, types
if {skip_init}:
    spec = importlib.util.find_spec("seqkv")
    pkg = types.ModuleType("seqkv")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["seqkv"] = pkg
from seqkv.cli import build_app
for args in {commands}:
    try:
        build_app()([*args, "--help"], prog_name="seqkv")
    except SystemExit as e:
        assert e.code == 0, (args, e.code)
for name in {also}:
    importlib.import_module(name)
print(json.dumps([m for m in {heavy} if m in sys.modules]), file=sys.stderr)
"""


def heavy_imports(skip_init: bool, commands: list[list[str]] | None = None,
                  heavy: list[str] = HEAVY, also: tuple[str, ...] = ()) -> list[str]:
    """The modules of ``heavy`` that `seqkv ARGS --help` (every command by default) imports."""
    commands = commands if commands is not None else [[]] + [[c] for c in COMMANDS]
    code = _PROBE.format(skip_init=skip_init, commands=commands, heavy=heavy, also=list(also))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stderr.strip().splitlines()[-1])


def test_help_of_every_command_imports_no_torch():
    assert heavy_imports(skip_init=True) == []


def test_seqkv_help_imports_no_torch():
    assert heavy_imports(skip_init=False) == []
