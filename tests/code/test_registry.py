"""The registry: published versions only, an atomic champion pointer, promote and rollback."""

import json

import pytest

from lxn_ray import registry
from lxn_ray.cli.registry import main as registry_main
from lxn_ray.infra.storage import Storage


def publish(storage: Storage, version: str, auc: float) -> None:
    storage.write_bytes(registry.model_key(version, "model.keras"), b"not needed here")
    storage.write_json(
        registry.model_key(version, "card.json"),
        {
            "model_version": version,
            "dataset_version": "ds-1",
            "threshold": 0.4,
            "test": {"auc": auc, "auc_ci": [auc - 0.1, auc + 0.1]},
            "val": {"auc": auc},
        },
    )


def test_promote_rollback_and_list(tmp_path):
    storage = Storage.open(str(tmp_path / "store"))
    publish(storage, "lxn-a", 0.6)
    publish(storage, "lxn-b", 0.7)
    storage.write_bytes(registry.model_key("lxn-unfinished", "model.keras"), b"")  # no card: not published
    assert registry.list_versions(storage) == ["lxn-a", "lxn-b"]
    assert registry.champion(storage) is None
    with pytest.raises(FileNotFoundError):
        registry.resolve(storage, "champion")
    with pytest.raises(FileNotFoundError):
        registry.promote(storage, "lxn-unfinished")

    registry.promote(storage, "lxn-a")
    registry.promote(storage, "lxn-b")
    assert registry.champion(storage) == "lxn-b"
    assert registry.resolve(storage, "champion").version == "lxn-b"
    assert registry.rollback(storage)["version"] == "lxn-a"
    assert registry.champion(storage) == "lxn-a"
    with pytest.raises(ValueError):
        registry.rollback(storage)  # lxn-a was the first champion
    assert [row["champion"] for row in registry.describe(storage)] == [True, False]


def test_registry_job_commands(tmp_path, capsys):
    store = str(tmp_path / "store")
    publish(Storage.open(store), "lxn-a", 0.6)
    publish(Storage.open(store), "lxn-b", 0.7)
    report = tmp_path / "r.json"
    assert registry_main(["--storage", store, "--report", str(report), "promote", "lxn-b"]) == 0
    assert registry_main(["--storage", store, "--report", str(report), "list"]) == 0
    listed = json.loads(report.read_text())
    assert listed["champion"] == "lxn-b" and len(listed["models"]) == 2
    assert "* lxn-b" in capsys.readouterr().out
    assert registry_main(["--storage", store, "promote", "lxn-missing"]) == 1
    assert registry_main(["--storage", store, "rollback"]) == 1  # no earlier champion
    assert registry_main(["--storage", store, "show", "lxn-a"]) == 0


def test_rollback_walks_back_through_promotions(tmp_path):
    storage = Storage.open(str(tmp_path / "store"))
    for version in ("lxn-a", "lxn-b", "lxn-c"):
        publish(storage, version, 0.5)
        registry.promote(storage, version)
    assert registry.rollback(storage)["version"] == "lxn-b"
    assert registry.rollback(storage)["version"] == "lxn-a"
    assert registry.champion(storage) == "lxn-a"


def _snapshot(folder) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_read_only_commands_leave_storage_unchanged_and_end_quietly_in_a_pipe(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    store = tmp_path / "store"
    publish(Storage.open(str(store)), "lxn-a", 0.6)
    before = _snapshot(store)
    assert registry_main(["--storage", str(store), "list"]) == 0
    assert registry_main(["--storage", str(store), "show", "lxn-a"]) == 0
    assert _snapshot(store) == before  # no report written for a read

    # `python jobs/registry.py show V | head -1`: the reader closes the pipe after one line, while the
    # card (larger than a pipe's buffer) is still being written
    card = Storage.open(str(store)).read_json(registry.model_key("lxn-a", "card.json"))
    card["history"] = [{"epoch": epoch, "val_auc": 0.5} for epoch in range(5000)]
    Storage.open(str(store)).write_json(registry.model_key("lxn-a", "card.json"), card)
    job = Path(__file__).resolve().parents[2] / "jobs" / "registry.py"
    command = f"{sys.executable} {job} --storage {store} show lxn-a | head -1"
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=120
    )
    assert result.stdout == "{\n"
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr
    assert result.returncode == 0


def test_lxn_help_lists_every_command(capsys):
    from lxn_ray.cli.main import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS)
    with pytest.raises(SystemExit) as exited:
        main(["registry", "--help"])
    assert exited.value.code == 0 and "usage: lxn registry" in capsys.readouterr().out
    assert main([]) == 2 and main(["nonsense"]) == 2
