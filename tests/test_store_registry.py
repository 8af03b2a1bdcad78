"""Store URLs: a backend chosen by scheme through the registry; unknown or mistyped schemes are
refused with one line (never a SQLite file named after the typo); no import cycle between the
backend interface, the registry and the backends."""

import ast
from pathlib import Path

import pytest
from typer.testing import CliRunner

import seqkv.store as store_pkg
from seqkv.cli import build_app
from seqkv.store import StoreError, open_backend
from seqkv.store.registry import SQLITE, backend_kind, register_backend

BAD = ["redis:/127.0.0.1:6379/0", "redis:127.0.0.1", "rdis://127.0.0.1:6379/0",
       "http://127.0.0.1:8765", "sqlite://x.db", "s3://bucket/key", "REDIS:/h"]


@pytest.mark.parametrize("url", BAD)
def test_unknown_or_mistyped_schemes_are_refused_and_nothing_is_created(tmp_path, monkeypatch,
                                                                       url):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match="store URL") as e:
        open_backend(url)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_plain_paths_are_sqlite_and_known_schemes_their_backend(tmp_path):
    for path in ("store.db", "./a:b.db", str(tmp_path / "x.db"), "C:store.db"):
        assert backend_kind(path) == SQLITE
    for url in ("redis://127.0.0.1:6379/0", "rediss://h:1/0", "unix:///tmp/redis.sock"):
        assert backend_kind(url) == url.split(":")[0]


def test_a_registered_scheme_opens_its_backend(tmp_path):
    seen = []

    def factory(url, create=True):
        seen.append((url, create))
        return open_backend(str(tmp_path / "inner.db"), create=create)

    register_backend("memtest", factory)
    b = open_backend("memtest://anything", create=True)
    assert seen == [("memtest://anything", True)] and b.url.endswith("inner.db")
    b.close()


@pytest.mark.parametrize("cmd", [["stats"], ["delete", "--session", "a"]])
def test_cli_refuses_a_mistyped_url_in_one_line(tmp_path, monkeypatch, cmd):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(build_app(), ["store", *cmd, "--db", "redis:/127.0.0.1:6379/0"])
    assert r.exit_code == 1 and "store URL" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


def _imports(module: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.add(node.module or "")
    return names


def test_no_cycle_between_the_interface_the_registry_and_the_backends():
    root = Path(store_pkg.__file__).parent
    assert _imports(root / "backend.py") == set()  # the interface imports no store module
    for backend in ("sqlite.py", "redis.py"):
        assert _imports(root / backend) <= {"backend"}
    assert _imports(root / "registry.py") == {"backend"}  # backends load by name, lazily
