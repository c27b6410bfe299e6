"""The storage layer: keys stay inside the store, writes are atomic, tables round-trip."""

import pyarrow as pa
import pytest

from lxn_ray.storage import Storage, StorageError


def test_round_trips_and_listing(tmp_path):
    storage = Storage.open(str(tmp_path / "store"))
    storage.write_json("a/b.json", {"x": 1})
    storage.write_table("a/t.parquet", pa.table({"n": [1, 2]}))
    assert storage.read_json("a/b.json") == {"x": 1}
    assert storage.read_table("a/t.parquet").column("n").to_pylist() == [1, 2]
    assert storage.list("a") == ["a/b.json", "a/t.parquet"]
    assert storage.list("nothing-here") == []
    assert storage.uri_of("a/b.json").startswith("file://")


def test_file_uri_and_env_default(tmp_path, monkeypatch):
    assert Storage.open(f"file://{tmp_path}/s").root == str(tmp_path / "s")
    monkeypatch.setenv("LXN_STORAGE", str(tmp_path / "env"))
    assert Storage.open().root == str(tmp_path / "env")


def test_keys_cannot_escape(tmp_path):
    storage = Storage.open(str(tmp_path / "store"))
    for key in ("../x", "a/../../x", "", "/"):
        with pytest.raises(StorageError):
            storage.write_bytes(key, b"")
    with pytest.raises(StorageError):
        Storage.open("ftp://example.org/x")


def test_failed_write_keeps_the_old_object_and_no_temporary(tmp_path):
    storage = Storage.open(str(tmp_path / "store"))
    storage.write_bytes("folder/k", b"old")
    (tmp_path / "store" / "folder" / "blocked").mkdir()  # a folder where the new object should go
    (tmp_path / "store" / "folder" / "blocked" / "x").write_bytes(b"")
    with pytest.raises(OSError):
        storage.write_bytes("folder/blocked", b"new")
    assert storage.read_bytes("folder/k") == b"old"
    assert storage.list("folder") == ["folder/blocked", "folder/k"]  # no temporary left behind
