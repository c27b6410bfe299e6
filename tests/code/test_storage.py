"""The storage layer: keys stay inside the store, writes are atomic, tables round-trip, conditional writes
let exactly one of several contenders win (locally and against an S3-compatible server)."""

import threading

import pyarrow as pa
import pytest

from lxn_ray.infra.storage import Storage, StorageError


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


# -- conditional writes (the retrain lock's primitives) ------------------------------------------------
def _race(count: int, attempt) -> list:
    """Run ``attempt(i)`` in ``count`` threads released together; their results in order."""
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        results[i] = attempt(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def check_conditional_writes(storage: Storage) -> None:
    """The contract of the conditional writes, the same for every backend."""
    results = _race(8, lambda i: storage.create_exclusive("locks/a", f"holder {i}".encode()))
    assert sum(results) == 1
    winner = results.index(True)
    data, token = storage.read_with_token("locks/a")
    assert data == f"holder {winner}".encode()  # complete, and the winner's
    assert storage.read_with_token("locks/missing") is None

    # A takeover with a token: of contenders holding the same token exactly one wins.
    results = _race(6, lambda i: storage.replace_if_unchanged("locks/a", f"taker {i}".encode(), token))
    assert sum(results) == 1
    data, new_token = storage.read_with_token("locks/a")
    assert data == f"taker {results.index(True)}".encode() and new_token != token
    assert not storage.replace_if_unchanged("locks/a", b"late", token)  # an outdated token never wins
    assert not storage.replace_if_unchanged("locks/missing", b"x", token)

    # An owner's renewal keeps the object present; an outdated token cannot replace or delete it.
    seen: list[bool] = []
    reader = threading.Thread(target=lambda: seen.extend(storage.exists("locks/a") for _ in range(300)))
    reader.start()
    assert storage.replace_if_unchanged("locks/a", b"renewed", new_token)
    reader.join()
    assert all(seen)
    data, renewed = storage.read_with_token("locks/a")
    assert data == b"renewed"
    assert not storage.replace_if_unchanged("locks/a", b"stale owner", new_token)
    assert not storage.delete_if_unchanged("locks/a", new_token)
    assert storage.read_bytes("locks/a") == b"renewed"
    assert storage.delete_if_unchanged("locks/a", renewed)
    assert not storage.exists("locks/a")
    assert storage.create_exclusive("locks/a", b"again")


def test_conditional_writes_local(tmp_path):
    storage = Storage.open(str(tmp_path / "store"))
    check_conditional_writes(storage)
    # no temporary file left behind (``*.guard`` are the empty files the kernel lock is taken on)
    assert [key for key in storage.list("locks") if not key.endswith(".guard")] == ["locks/a"]


def test_conditional_writes_s3(s3_bucket):
    storage = Storage.open(f"s3://{s3_bucket}/store")
    check_conditional_writes(storage)


def test_s3_round_trip_through_single_puts(s3_bucket):
    """Everything the store writes on S3 is one PutObject, large objects included (no multipart upload
    to complete or leave half-done), and reads back byte for byte."""
    import boto3

    storage = Storage.open(f"s3://{s3_bucket}/store")
    big = bytes(range(256)) * (48 * 1024)  # 12 MiB, past one multipart part
    storage.write_bytes("models/v1/model.keras", big)
    storage.write_json("models/CHAMPION.json", {"version": "v1"})
    assert storage.read_bytes("models/v1/model.keras") == big
    assert storage.read_json("models/CHAMPION.json") == {"version": "v1"}
    assert storage.list("models") == ["models/CHAMPION.json", "models/v1"]
    head = boto3.client("s3").head_object(Bucket=s3_bucket, Key="store/models/v1/model.keras")
    assert head["ContentLength"] == len(big) and "-" not in head["ETag"]  # not a multipart ETag
