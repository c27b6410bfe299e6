"""Dataset versions: splits are by patient, deterministic and frozen; publication is all-or-nothing."""

import pyarrow as pa
import pytest

from lxn_ray.data import dataset
from lxn_ray.infra.storage import Storage


def test_new_patients_split_about_70_15_15_deterministically():
    config = dataset.SplitConfig()
    splits = [config.split_of(f"patient-{i}") for i in range(4000)]
    assert splits == [config.split_of(f"patient-{i}") for i in range(4000)]
    shares = {name: splits.count(name) / len(splits) for name in dataset.SPLITS}
    assert abs(shares["train"] - 0.70) < 0.03 and abs(shares["val"] - 0.15) < 0.03


def test_earlier_splits_are_frozen_and_groups_share_a_split():
    previous = {"a": "test", "b": "train"}
    splits = dataset.assign_splits([{"a", "b", "c"}, {"d", "e"}], previous)
    assert splits["a"] == "test" and splits["b"] == "train"  # a patient never changes split
    assert splits["c"] == "test"  # new members follow the smallest already-split member
    assert splits["d"] == splits["e"]


def test_publish_is_all_or_nothing(tmp_path, monkeypatch):
    storage = Storage.open(str(tmp_path / "store"))
    tables = {"images": pa.table({"split": ["train"], "finding": ["COVID-19"], "label": [1]})}
    dataset.publish(storage, "ds-1", tables, {"r": 1}, {"source_version": "s1"})
    assert dataset.latest_version(storage) == "ds-1"

    original = Storage.write_json

    def crash_on_manifest(self, key, value):
        if key.endswith("manifest.json"):
            raise OSError("node lost")
        original(self, key, value)

    monkeypatch.setattr(Storage, "write_json", crash_on_manifest)
    with pytest.raises(OSError):
        dataset.publish(storage, "ds-2", tables, {"r": 2}, {"source_version": "s2"})
    monkeypatch.undo()
    assert dataset.latest_version(storage) == "ds-1"
    assert dataset.remove_unpublished(storage) == ["ds-2"]
    assert dataset.resolve_version(storage, "latest") == "ds-1"
    assert dataset.read_split(storage, None, "train").num_rows == 1
    with pytest.raises(FileNotFoundError):
        dataset.resolve_version(storage, "ds-2")
