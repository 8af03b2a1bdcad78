"""Written files follow the umask like a plain open(), and errors name the output
path, never the temp file that makes the write atomic."""

import os
import stat

import pytest
from typer.testing import CliRunner

from seqkv.cli import build_app
from seqkv.core.blob import write_atomic
from seqkv.core.errors import SeqkvError

runner = CliRunner()
app = build_app()


@pytest.fixture()
def umask():
    def set_(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    write_atomic(tmp_path / "f", b"data")
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o666 & ~mask
    assert (tmp_path / "f").read_bytes() == b"data"


def test_overwrite_keeps_the_files_mode(tmp_path, umask):
    umask(0o022)
    f = tmp_path / "f"
    f.write_bytes(b"old")
    f.chmod(0o600)
    write_atomic(f, b"new")
    assert f.read_bytes() == b"new" and stat.S_IMODE(f.stat().st_mode) == 0o600


def test_writing_to_a_directory_names_the_path_not_a_temp_file(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(SeqkvError, match=f"^is a directory: {tmp_path / 'adir'}$"):
        write_atomic(tmp_path / "adir", b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["adir"]  # no temp file left


def test_unwritable_folder_names_the_path_not_a_temp_file(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(SeqkvError) as e:
            write_atomic(locked / "f", b"x")
        assert str(locked / "f") in str(e.value) and ".tmp" not in str(e.value)
    finally:
        locked.chmod(0o700)


def test_cli_output_follows_the_umask(tmp_path, umask, monkeypatch, llama):
    """kv-dump end to end (a tiny model's cache) writes 0o640 under umask 027."""
    umask(0o027)
    monkeypatch.setattr("seqkv.cli.kv.load", lambda model, needed=None: llama)
    monkeypatch.setattr("seqkv.core.textcodec.encode_text",
                        lambda tok, text: (list(range(5, 15)), None))
    (tmp_path / "t.txt").write_text("ten tokens")
    r = runner.invoke(app, ["kv-dump", str(tmp_path / "t.txt"), "-o", str(tmp_path / "c.st")])
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE((tmp_path / "c.st").stat().st_mode) == 0o640
