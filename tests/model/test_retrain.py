"""Scheduled retraining end to end on a growing synthetic source and a real local Ray cluster: the decision
sequence, two ``--once`` runs started together, a run killed mid-training, ``--every`` carrying on after a
failing tick and stopping on SIGTERM - and the lease lock itself (stale takeover, renewal, losing it)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from lxn_ray import registry
from lxn_ray.cli.retrain import main as retrain_main
from lxn_ray.data import dataset
from lxn_ray.infra.lease import LeaseLock, LockLost, _pid_namespace
from lxn_ray.infra.storage import Storage
from lxn_ray.retraining.retrain import (
    HISTORY,
    HISTORY_PLOT,
    LOCK,
    gate,
    next_tick_delay,
    read_history,
    train_config_from_card,
)
from lxn_ray.retraining.settings import RetrainSettings, TrainOverrides, parse_duration
from lxn_ray.training.runs import registered_epoch
from tests.helpers import SourceBuilder, copy_store, job_env, wait_for
from tests.shared_stores import labelled_source

# Tests that run retrain jobs on the session's Ray cluster are marked `slow` (`-m "not slow"` skips them);
# the lease lock's and the small parts' tests are quick.
REPO = Path(__file__).resolve().parents[2]
TINY = ["--image-size", "32", "--width", "0.125", "--batch-size", "8", "--lr", "1e-3", "--epochs", "1"]


class Replay:
    """A growing source (``grow`` adds patients) and the store the retrain job keeps up to date."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.builder = SourceBuilder(root / "source")
        self.patients = 0
        self.storage = Storage.open(str(root / "store"))
        self.grow(60)

    def grow(self, patients: int) -> None:
        labelled_source(self.builder, patients=patients, offset=self.patients)
        self.patients += patients

    def argv(self, *extra: str) -> list[str]:
        return ["--source", str(self.builder.root), "--storage", self.storage.uri, *TINY, *extra]

    def run(self, name: str, *extra: str) -> dict:
        """One ``--once`` tick in this process; its report."""
        path = self.root / f"{name}.json"
        assert retrain_main([*self.argv("--once", *extra), "--report", str(path)]) == 0
        return json.loads(path.read_text())


@pytest.fixture(scope="module")
def replay(tmp_path_factory, ray_local) -> tuple[Replay, dict]:
    """A store whose first retrain tick trained the first model and made it the champion - by hand where
    promotion's guard kept it out for being no better than chance, as a user would."""
    replay = Replay(tmp_path_factory.mktemp("retrain"))
    first = replay.run("first", "--min-new-images", "5")
    if registry.champion(replay.storage) is None:
        registry.promote(replay.storage, first["challenger"], reason="the tests: by hand")
    return replay, first


@pytest.mark.slow
def test_decision_sequence_first_no_change_below_threshold_then_judged(replay):
    replay, first = replay
    storage = replay.storage
    # The first model is promoted unless it is no better than chance (then it is rejected, saying so).
    chance = first["metrics"]["challenger"]["no_better_than_chance"]
    assert first["decision"] == ("rejected" if chance else "promoted") and first["champion_before"] is None
    assert first["champion"] == (None if chance else first["challenger"])
    if chance:
        assert "is no better than chance" in first["reason"]
    assert registry.champion(storage) == first["challenger"]  # by hand, where the guard kept it out
    assert first["metrics"]["champion"] is None and first["metrics"]["challenger"]["auc"] is not None
    assert first["new_images"] == first["changed_rows"] == first["ingest"]["usable"] > 0
    assert "non-inferiority" in first["rule"] and "-0.05" in first["rule"] and "shortcut" in first["rule"]
    card = registry.read_card(storage, first["champion"])
    assert card["config"]["image_size"] == 32 and card["config"]["epochs"] == 1

    again = replay.run("again")
    assert again["decision"] == "no-change" and again["new_images"] == 0
    assert again["ingest"]["changed"] is False and again["challenger"] is None
    assert again["champion"] == first["challenger"]

    replay.grow(14)
    below = replay.run("below", "--min-new-images", "1000")
    assert below["decision"] == "below-threshold" and 0 < below["new_images"] < 1000
    assert below["dataset_version"] != first["dataset_version"]
    growth = replay.run("growth", "--min-new-images", "1", "--min-growth", "10")
    assert growth["decision"] == "below-threshold" and "--min-growth" in growth["reason"]

    judged = replay.run("judged", "--min-new-images", "5")
    assert judged["decision"] in ("promoted", "rejected")
    assert judged["new_images"] == below["new_images"] and judged["challenger"] != first["challenger"]
    metrics = judged["metrics"]
    test_split = dataset.read_split(storage, judged["dataset_version"], "test")
    assert metrics["n"] == test_split.num_rows
    for role, version in (("challenger", judged["challenger"]), ("champion", first["challenger"])):
        model = metrics[role]
        assert model["model_version"] == version and model["n"] == test_split.num_rows
        assert {"auc", "sensitivity", "specificity", "threshold"} <= set(model)
        assert model["threshold"] == registry.read_card(storage, version)["threshold"]
    low, high = metrics["difference_ci"]
    assert low <= metrics["difference"] <= high
    assert metrics["difference"] == pytest.approx(
        metrics["challenger"]["objective"] - metrics["champion"]["objective"]
    )
    passes = low >= -0.05 and not metrics["challenger"]["no_better_than_chance"]
    assert (judged["decision"] == "promoted") == passes
    expected = judged["challenger"] if judged["decision"] == "promoted" else first["challenger"]
    assert judged["champion"] == registry.champion(storage) == expected
    # The champion's hyperparameters were reused: same config, new dataset version.
    assert registry.read_card(storage, judged["challenger"])["config"] == card["config"]

    history = read_history(storage)
    assert [entry["decision"] for entry in history] == [
        first["decision"],
        "no-change",
        "below-threshold",
        "below-threshold",
        judged["decision"],
    ]
    assert history[-1]["challenger_auc"] == metrics["challenger"]["auc"]
    assert storage.read_bytes(HISTORY_PLOT)[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(storage.list("reports/retrain")) == 5
    assert not storage.exists(LOCK)  # released after every tick


@pytest.mark.slow
def test_a_retrain_killed_mid_training_leaves_the_champion_and_the_next_run_resumes(replay):
    replay, _ = replay
    storage = replay.storage
    replay.grow(14)
    champion, models = registry.champion(storage), registry.list_versions(storage)
    argv = replay.argv("--once", "--min-new-images", "5", "--epochs", "4")
    runs = Path(storage.path("runs"))
    before = {path.name for path in runs.iterdir()}
    log = replay.root / "killed.log"
    with open(log, "wb") as output:
        job = subprocess.Popen(
            [sys.executable, "jobs/retrain.py", *argv],
            cwd=REPO,
            env=job_env(),
            start_new_session=True,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:

        def checkpoint_registered() -> str | None:
            """A new training run whose epoch checkpoint Ray Train has recorded (so a rerun resumes it)."""
            assert job.poll() is None, f"the retrain ended before it was killed:\n{log.read_text()[-3000:]}"
            for run in runs.iterdir():
                if run.name not in before and registered_epoch(storage, run.name):
                    return run.name
            return None

        run_name = wait_for(checkpoint_registered, 300, "an epoch checkpoint of the retrain's run", 0.3)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert job.returncode == -signal.SIGKILL
    assert registry.champion(storage) == champion and registry.list_versions(storage) == models
    assert storage.exists(LOCK)  # the dead holder's lease is still there...

    report = replay.run("after-kill", "--min-new-images", "5", "--epochs", "4")
    assert report["decision"] in ("promoted", "rejected")
    assert "is gone" in report["lock"]["took_over"]["reason"]  # ...and was taken over at once
    assert report["training"]["train_run"] == run_name and report["training"]["reused"] is False
    card = registry.read_card(storage, report["challenger"])
    assert card["resumes"] == 1 and [e["epoch"] for e in card["history"]] == [1, 2, 3, 4]
    assert registry.champion(storage) == report["champion"]
    assert read_history(storage)[-1]["decision"] == report["decision"]


@pytest.mark.slow
def test_two_once_runs_started_together_do_not_overlap(replay):
    """Two ``jobs/retrain.py --once`` processes on one store: one works while the other waits for the
    lock, then finds the work done; one new dataset version, one new model, an intact history."""
    replay, _ = replay
    storage = replay.storage
    replay.grow(14)
    models, versions = set(registry.list_versions(storage)), set(storage.list("datasets"))
    history_before = len(read_history(storage))
    paths = [replay.root / f"together-{i}.json" for i in range(2)]
    logs = [replay.root / f"together-{i}.log" for i in range(2)]
    jobs = []
    for path, log in zip(paths, logs, strict=True):
        with open(log, "wb") as output:
            argv = replay.argv("--once", "--min-new-images", "5", "--lock-ttl", "30s", "--report", str(path))
            jobs.append(
                subprocess.Popen(
                    [sys.executable, "jobs/retrain.py", *argv],
                    cwd=REPO,
                    env=job_env(),
                    start_new_session=True,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        wait_for(lambda: all(job.poll() is not None for job in jobs), 400, "both retrain runs to end", 0.5)
    finally:
        for job in jobs:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
    for job, log in zip(jobs, logs, strict=True):
        assert job.returncode == 0, log.read_text()[-3000:]
    reports = [json.loads(path.read_text()) for path in paths]
    first, second = sorted(reports, key=lambda report: report["lock"]["waited_s"])
    assert second["lock"]["waited_s"] > 0  # they really contended: one waited for the other's lock
    assert first["decision"] in ("promoted", "rejected") and first["training"]["reused"] is False
    # The waiter ran its tick afterwards: nothing new to train, or the same challenger judged again.
    assert second["decision"] in ("no-change", "rejected")
    assert second["ingest"]["changed"] is False
    if second["decision"] == "rejected":
        assert second["training"]["reused"] and second["challenger"] == first["challenger"]
    assert len(set(registry.list_versions(storage)) - models) == 1
    assert len(set(storage.list("datasets")) - versions) == 1
    assert registry.champion(storage) in registry.list_versions(storage)

    entries = read_history(storage)[history_before:]
    assert len(entries) == 2
    spans = sorted((entry["lock_acquired_at"], entry["at"]) for entry in entries)
    assert spans[0][1] <= spans[1][0]  # one tick ended (under its lock) before the other took it
    assert not storage.exists(LOCK)
    assert [key for key in storage.list("retrain") if ".new-" in key or ".tmp-" in key] == []


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_every_carries_on_after_failing_ticks_and_stops_cleanly_on_sigterm(tmp_path):
    storage = Storage.open(str(tmp_path / "store"))
    argv = ["--source", str(tmp_path / "missing"), "--storage", storage.uri, "--every", "1s"]
    job = subprocess.Popen(  # on the test cluster: Ray's own SIGTERM handler must not win
        [sys.executable, "jobs/retrain.py", *argv, "--report", str(tmp_path / "r.json")],
        cwd=REPO,
        env=job_env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def failed_ticks() -> int:
            assert job.poll() is None, "the --every loop ended on a failing tick"
            return sum(entry["decision"] == "error" for entry in read_history(storage)) >= 2

        wait_for(failed_ticks, 120, "two failed ticks in the history")
        job.send_signal(signal.SIGTERM)
        stdout, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 0, stderr[-2000:]
    assert "error: tick failed: SourceError" in stderr and "carrying on" in stderr
    assert "SIGTERM: stopping" in stderr
    assert "ticks: error, error" in stdout
    history = read_history(storage)
    assert all("no such folder" in entry["error"] for entry in history)
    assert not storage.exists(LOCK)


# -- the lease lock -----------------------------------------------------------------------------------
def _write_lease(storage: Storage, **fields) -> None:
    now = datetime.now(timezone.utc)
    lease = {
        "holder": "someone",
        "host": "another-host",
        "pid": 1,
        "acquired_at": now.isoformat(),
        "renewed_at": now.isoformat(),
        "expires_at": (now + timedelta(minutes=10)).isoformat(),
        "ttl_s": 600.0,
        **fields,
    }
    storage.write_json(LOCK, lease)


def test_a_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path):
    storage = Storage.open(str(tmp_path / "store"))
    _write_lease(storage)  # live: another host, not expired
    contender = LeaseLock(storage, LOCK, ttl_s=60)
    assert not contender.try_acquire() and contender.blocker.holder == "someone"

    past = (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat()
    _write_lease(storage, expires_at=past)
    assert contender.try_acquire()
    assert "expired" in contender.took_over["reason"] and contender.took_over["holder"] == "someone"
    assert contender.read().holder == contender.holder
    assert contender.release() and not storage.exists(LOCK)

    # A holder on this host whose process is gone: taken over at once, long before its expiry.
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(finished.stdout)
    _write_lease(storage, host=socket.gethostname(), pid=dead_pid, pid_namespace=_pid_namespace())
    taker = LeaseLock(storage, LOCK, ttl_s=60)
    assert taker.try_acquire() and "is gone" in taker.took_over["reason"]
    # ...but not one whose process lives (this one).
    other = LeaseLock(storage, LOCK, ttl_s=60)
    assert not other.try_acquire() and other.blocker.pid == os.getpid()
    taker.release()


def test_contenders_for_one_stale_lock_exactly_one_wins(tmp_path):
    storage = Storage.open(str(tmp_path / "store"))
    for _ in range(5):
        _write_lease(storage, expires_at=(datetime.now(timezone.utc) - timedelta(seconds=5)).isoformat())
        locks = [LeaseLock(storage, LOCK, ttl_s=60) for _ in range(6)]
        barrier, results = threading.Barrier(len(locks)), [False] * len(locks)

        def contend(i: int, locks=locks, barrier=barrier, results=results) -> None:
            barrier.wait()
            results[i] = locks[i].try_acquire()

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(locks))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sum(results) == 1
        winner = locks[results.index(True)]
        assert storage.read_json(LOCK)["holder"] == winner.holder
        winner.ensure_held()
        winner.release()


def test_the_holder_renews_its_lease_and_notices_losing_it(tmp_path):
    storage = Storage.open(str(tmp_path / "store"))
    holder = LeaseLock(storage, LOCK, ttl_s=3.0)
    assert holder.acquire(timeout_s=5)
    first_expiry = datetime.fromisoformat(holder.read().expires_at)
    with holder.holding():
        wait_for(
            lambda: datetime.fromisoformat(holder.read().expires_at) > first_expiry, 20, "a renewal", 0.1
        )
        wait_for(lambda: datetime.now(timezone.utc) > first_expiry, 10, "the first expiry to pass", 0.1)
        assert not LeaseLock(storage, LOCK, ttl_s=3.0).try_acquire()  # renewed, so not stale
        holder.ensure_held()
    assert not storage.exists(LOCK)  # released at the end

    # Lost: another run took the lease over (this holder failed to renew in time).
    assert holder.acquire(timeout_s=5)
    _write_lease(storage, holder="usurper")
    assert not holder.renew()
    with pytest.raises(LockLost):
        holder.ensure_held()
    assert not holder.release() and storage.read_json(LOCK)["holder"] == "usurper"


def test_no_wait_exits_cleanly_and_lock_timeout_fails_when_another_run_holds_the_lock(tmp_path, capsys):
    storage = Storage.open(str(tmp_path / "store"))
    holder = LeaseLock(storage, LOCK, ttl_s=60)
    assert holder.acquire(timeout_s=5)
    argv = ["--source", str(tmp_path / "src"), "--storage", storage.uri, "--once"]
    report = tmp_path / "locked.json"
    assert retrain_main([*argv, "--no-wait", "--report", str(report)]) == 0
    locked = json.loads(report.read_text())
    assert locked["decision"] == "locked" and holder.holder in locked["reason"]
    assert "retrain: locked" in capsys.readouterr().out

    assert retrain_main([*argv, "--lock-timeout", "1s"]) == 1
    assert "error: retrain failed: LockTimeout" in capsys.readouterr().err
    assert storage.read_json(LOCK)["holder"] == holder.holder  # untouched by either
    holder.release()
    assert not storage.exists(HISTORY)  # neither run ticked


# -- small parts --------------------------------------------------------------------------------------
def test_durations_and_tick_times():
    assert parse_duration("6h") == 21600 and parse_duration("15m") == 900 and parse_duration("1d") == 86400
    assert parse_duration("90s") == 90 and parse_duration("45") == 45 and parse_duration("1.5h") == 5400
    for bad in ("", "h", "6x", "-1h", "0s", "6 hours"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert next_tick_delay(started=100.0, now=130.0, every_s=60.0) == 30.0
    assert next_tick_delay(started=100.0, now=270.0, every_s=60.0) == 10.0  # overran 2 ticks: skip them


def test_champion_hyperparameters_with_flags_on_top():
    card = {"config": {"image_size": 64, "learning_rate": 3e-4, "epochs": 4, "augment": {"rotation": 2.0}}}
    config = train_config_from_card(card, TrainOverrides(epochs=1, use_gpu=None))
    assert (config.image_size, config.learning_rate, config.epochs) == (64, 3e-4, 1)
    assert config.augment.rotation == 2.0
    assert train_config_from_card(None, TrainOverrides(image_size=32)).image_size == 32


def _rewrite_metadata(root: Path, change) -> None:
    """Apply ``change(row) -> row | None`` to every row of a source folder's metadata.csv (None drops it)."""
    import csv
    import io

    text = (root / "metadata.csv").read_text(encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=reader.fieldnames)
    writer.writeheader()
    for row in reader:
        if (changed := change(dict(row))) is not None:
            writer.writerow(changed)
    (root / "metadata.csv").write_text(out.getvalue(), encoding="utf-8")


@pytest.mark.slow
def test_relabelled_and_removed_rows_make_a_tick_train_a_challenger(trained_store, tmp_path):
    """Metadata corrections to the source of a store whose champion was trained on it (the session's
    shared tiny model, tests/shared_stores.py): three COVID-19 films relabelled and two PA films found to be
    lateral. No image is added, and the tick must still train a challenger (each kind of correction alone
    retrains too: ``test_any_correction_retrains_however_few_and_additions_wait_for_the_threshold``)."""
    import shutil

    source = shutil.copytree(trained_store.source, tmp_path / "source")
    storage = Storage.open(str(copy_store(trained_store.store, tmp_path / "store")))
    champion = registry.champion(storage)
    covid = dataset.read_table(storage, dataset.latest_version(storage), "images").to_pylist()
    relabel = set(sorted(row["filename"] for row in covid if row["finding"] == "COVID-19")[:3])
    lateral = set(sorted({row["filename"] for row in covid if row["view"] == "PA"} - relabel)[:2])

    def correct(row: dict) -> dict:
        if row["filename"] in relabel:
            return {**row, "finding": "SARS"}
        return {**row, "view": "L"} if row["filename"] in lateral else row

    _rewrite_metadata(source, correct)
    path = tmp_path / "corrected.json"
    assert (
        retrain_main(
            ["--source", str(source), "--storage", storage.uri, *TINY, "--once", "--report", str(path)]
        )
        == 0
    )
    report = json.loads(path.read_text())
    assert report["champion_before"] == champion == trained_store.report["model_version"]
    changes = report["changes"]
    assert (changes["relabelled"], changes["removed"], changes["added"]) == (3, 2, 0)
    assert report["decision"] in ("promoted", "rejected") and report["challenger"] not in (None, champion)
    assert "3 relabelled" in report["trigger"] and "corrections always retrain" in report["trigger"]


def test_any_correction_retrains_however_few_and_additions_wait_for_the_threshold():
    settings = RetrainSettings(min_new_images=10)
    none = dict.fromkeys(("added", "removed", "relabelled", "view_changed", "patient_changed"), 0)
    for kind in ("removed", "relabelled", "view_changed", "patient_changed"):
        changes = {**none, kind: 1, "total": 1}
        decision, why = gate("champion", "v1", changes, 100, settings)
        assert decision is None and "corrections always retrain" in why, kind
    assert gate("champion", "v1", {**none, "added": 1, "total": 1}, 100, settings)[0] == "below-threshold"
    assert gate("champion", "v1", {**none, "total": 0}, 100, settings)[0] == "no-change"
    assert gate(None, None, {**none, "total": 0}, 0, settings)[0] is None  # the first tick trains
