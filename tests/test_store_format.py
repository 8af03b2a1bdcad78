"""A store written by a later seqkv (a higher format in its meta record) is refused by name,
by the library and by the CLI, instead of being misread."""

import pytest
from typer.testing import CliRunner

from seqkv.cli import build_app
from seqkv.core.blob import pack
from seqkv.store import Store, StoreError
from seqkv.store.records import parse
from seqkv.store.store import META_NS, STORE_FORMAT

from .test_store_backends import CHUNK


def test_a_later_format_is_refused_by_name(tmp_path, llama):
    db = str(tmp_path / "later.db")
    s = Store(db, llama, chunk=CHUNK)
    s.put("a", [5, 6, 7])
    meta, sections = parse("meta", "store", s.backend.read(META_NS, "meta", "store"))
    assert meta["format"] == STORE_FORMAT
    meta["format"] = STORE_FORMAT + 1
    with s.backend.transaction(META_NS) as txn:
        txn.put("meta", "store", pack(meta, sections))
    with pytest.raises(StoreError, match=f"format {STORE_FORMAT + 1}, newer than this seqkv"):
        Store(db, llama)
    result = CliRunner().invoke(build_app(), ["store", "stats", "--db", db])
    assert result.exit_code != 0 and "upgrade seqkv" in result.output
    assert "Traceback" not in result.output


def test_a_store_of_another_engine_version_is_refused_by_name(tmp_path, llama):
    """A store coded by engine 1 (int8 weights with a rounding residual) opens without a model
    (stats, raw edges) but not with one: its coded edges need engine 1's integers."""
    from seqkv.core.errors import ModelMismatchError
    from seqkv.core.version import ENGINE_ID

    db = str(tmp_path / "old.db")
    s = Store(db, llama, chunk=CHUNK)
    s.put("a", [5, 6, 7])
    meta, sections = parse("meta", "store", s.backend.read(META_NS, "meta", "store"))
    assert meta["numerics"]["engine"] == ENGINE_ID
    meta["numerics"]["engine"] = 1
    with s.backend.transaction(META_NS) as txn:
        txn.put("meta", "store", pack(meta, sections))
    with pytest.raises(ModelMismatchError,
                       match=f"integer engine version 1; this seqkv has version {ENGINE_ID}"):
        Store(db, llama)
    assert Store(db).stats()["sessions"] == 1
