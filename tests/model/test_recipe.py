"""The training recipe without Ray: seeded epoch orders and balanced sampling, precision selection, every
optimizer / schedule / architecture switch taking real steps, exact optimizer-state round trips, collapse
and early-stopping rules, and the configs that carry them (TrainConfig, a Tune trial)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lxn_ray.images.preprocess import PreprocessConfig
from lxn_ray.model.network import (
    ModelConfig,
    OptimizerConfig,
    build_lxn,
    cpu_supports_bfloat16,
    make_optimizer,
    optimizer_state,
    resolve_precision,
    restore_optimizer_state,
    weighted_bce,
)
from lxn_ray.training.config import TrainConfig
from lxn_ray.training.loop import epoch_order, is_collapsed, stop_reason
from lxn_ray.tuning.settings import TuneSettings
from lxn_ray.tuning.space import RECIPE_CHOICES, search_space, trial_train_config

LABELS = np.array([1] * 90 + [0] * 10, dtype=np.float32)  # imbalanced, as ieee8023's COVID-19 share
SOURCES = np.array(["a"] * 60 + ["b"] * 30 + ["a"] * 5 + ["b"] * 5)


def test_epoch_order_is_a_seeded_shuffle_that_changes_every_epoch():
    first, second = (epoch_order(LABELS, SOURCES, "weighted", seed=0, epoch=e) for e in (1, 2))
    assert sorted(first) == list(range(100))  # every image once
    assert not np.array_equal(first, second)  # a new order each epoch
    assert np.array_equal(first, epoch_order(LABELS, SOURCES, "weighted", seed=0, epoch=1))  # reproducible
    assert not np.array_equal(first, epoch_order(LABELS, SOURCES, "weighted", seed=1, epoch=1))
    # No longer metadata order: the first batches mix the classes.
    assert 0 < LABELS[first[:20]].sum() < 20 or 0 < LABELS[first[20:40]].sum() < 20


def test_class_balanced_sampling_draws_each_class_half_the_time():
    draws = np.concatenate([epoch_order(LABELS, SOURCES, "class-balanced", 0, e) for e in range(1, 51)])
    assert len(draws) == 50 * 100
    assert LABELS[draws].mean() == pytest.approx(0.5, abs=0.02)
    # Within a class, uniformly: source a holds 2/3 of the positives and gets ~2/3 of their draws.
    positives = draws[LABELS[draws] == 1]
    assert (SOURCES[positives] == "a").mean() == pytest.approx(60 / 90, abs=0.03)


def test_source_balanced_sampling_gives_every_source_an_equal_share_of_each_class():
    draws = np.concatenate([epoch_order(LABELS, SOURCES, "source-balanced", 0, e) for e in range(1, 51)])
    assert LABELS[draws].mean() == pytest.approx(0.5, abs=0.02)
    for label in (0, 1):
        of_class = draws[LABELS[draws] == label]
        assert (SOURCES[of_class] == "a").mean() == pytest.approx(0.5, abs=0.03)


CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {extra}\nmodel name\t: x\n"


@pytest.mark.parametrize(
    ("extra", "on_gpu", "expected"),
    [
        ("avx512_bf16 amx_bf16 amx_tile", False, "bfloat16"),
        ("amx_bf16", False, "bfloat16"),
        ("avx512_vnni", False, "float32"),  # AVX-512 without BF16: TensorFlow would emulate bfloat16
        ("avx512_bf16", True, "float16"),  # GPUs train in float16
    ],
)
def test_auto_precision_follows_the_cpu_flags_and_the_gpu(extra, on_gpu, expected):
    assert resolve_precision("auto", on_gpu=on_gpu, cpuinfo=CPUINFO.format(extra=extra)) == expected


def test_explicit_precisions_and_their_errors():
    no_bf16 = CPUINFO.format(extra="")
    assert not cpu_supports_bfloat16(no_bf16) and cpu_supports_bfloat16(CPUINFO.format(extra="avx512_bf16"))
    assert resolve_precision("bfloat16", on_gpu=False, cpuinfo=no_bf16) == "bfloat16"  # asked: done
    assert resolve_precision("float32", on_gpu=True) == "float32"
    with pytest.raises(ValueError, match="float16 needs GPU"):
        resolve_precision("float16", on_gpu=False)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int8", on_gpu=False)


TINY_MODEL = dict(image_size=32, width=0.125)


@pytest.mark.parametrize(
    ("architecture", "optimizer", "schedule"),
    list(itertools.product(("lxn", "lxn-bn"), ("rmsprop", "adam", "adamw"), ("constant", "cosine"))),
)
def test_every_recipe_switch_builds_and_takes_training_steps(architecture, optimizer, schedule):
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = build_lxn(ModelConfig(**TINY_MODEL, architecture=architecture))
    config = OptimizerConfig(
        optimizer, 1e-2, schedule, total_steps=4, warmup_steps=1 if schedule == "cosine" else 0
    )
    opt = make_optimizer(config)
    images = tf.constant(np.random.default_rng(0).random((8, 32, 32, 3), dtype=np.float32))
    labels = tf.constant([1, 0] * 4, dtype=tf.float32)
    before = [w.numpy().copy() for w in model.trainable_variables]
    rates = []
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(weighted_bce(labels, model(images, training=True), 0.5, 0.5))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        rates.append(float(keras.ops.convert_to_numpy(opt.learning_rate)))
        assert np.isfinite(float(loss))
    assert any(
        not np.array_equal(b, a.numpy()) for b, a in zip(before, model.trainable_variables, strict=True)
    )
    if schedule == "cosine":  # warm-up to the peak after 1 step, then decay
        assert rates[0] == pytest.approx(1e-2) and rates[1] < rates[0] and rates[2] < rates[1]
    else:
        assert rates == pytest.approx([1e-2] * 3)

    # The checkpoint's optimizer state restores exactly into a fresh optimizer.
    saved = optimizer_state(opt)
    fresh = make_optimizer(config)
    restore_optimizer_state(fresh, model, saved)
    assert set(optimizer_state(fresh)) == set(saved)
    for key, value in optimizer_state(fresh).items():
        np.testing.assert_array_equal(value, saved[key])


def test_restoring_another_optimizer_state_is_refused():
    model = build_lxn(ModelConfig(**TINY_MODEL))
    adam = make_optimizer(OptimizerConfig("adam"))
    adam.build(model.trainable_variables)
    with pytest.raises(ValueError, match="optimizer state does not match"):
        restore_optimizer_state(make_optimizer(OptimizerConfig("rmsprop")), model, optimizer_state(adam))


def test_lxn_bn_replaces_the_dense_layer_and_keeps_grad_cams_layer():
    paper, normalised = (build_lxn(ModelConfig(architecture=a)) for a in ("lxn", "lxn-bn"))
    assert paper.count_params() == 9_561_889
    assert normalised.count_params() < 1_300_000  # no 8.4 M-parameter Dense 512 after the flatten
    assert "block4_conv2" in [layer.name for layer in normalised.layers]
    with pytest.raises(ValueError, match="architecture must be one of"):
        ModelConfig(architecture="resnet")


def test_collapse_and_early_stopping_rules():
    assert is_collapsed(np.full(10, 0.73, np.float32), np.ones(10))
    assert is_collapsed(np.linspace(0, 1, 10), np.array([1.0, np.nan]))
    assert not is_collapsed(np.linspace(0.4, 0.6, 10), np.ones(10))
    assert not is_collapsed(np.array([0.5]), np.ones(1))  # one image is no evidence of a constant output

    def history(*objectives, collapsed_last=False):
        rows = [{"epoch": i + 1, "val_objective": v, "collapsed": False} for i, v in enumerate(objectives)]
        rows[-1]["collapsed"] = collapsed_last
        return rows

    config = TrainConfig(epochs=10, patience=2)
    assert stop_reason(history(0.6, 0.7, 0.65), config) is None
    assert stop_reason(history(0.6, 0.7, 0.65, 0.69), config) == "early stopping"
    assert stop_reason(history(0.6, None), config) is None  # an undefined objective counts as chance
    assert stop_reason(history(0.6, 0.7, collapsed_last=True), config) == "collapsed"
    assert stop_reason(history(0.6, 0.5, 0.5, 0.5), TrainConfig(epochs=10)) is None  # patience 0: off


def test_train_config_checks_its_recipe_and_reads_old_cards():
    for bad in (
        {"optimizer": "sgd"},
        {"schedule": "step"},
        {"sampling": "oversample"},
        {"precision": "fp8"},
        {"architecture": "vgg"},
        {"patience": -1},
    ):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    config = TrainConfig(optimizer="adamw", schedule="cosine", warmup_epochs=2, epochs=10)
    optimizer = config.optimizer_config(steps_per_epoch=5)
    assert (optimizer.total_steps, optimizer.warmup_steps, optimizer.name) == (50, 10, "adamw")
    import dataclasses

    assert TrainConfig.from_dict(dataclasses.asdict(config)) == config
    old_card = {"image_size": 64, "mixed_precision": True, "augment": {"rotation": 5.0}, "sources": ["a"]}
    read = TrainConfig.from_dict(old_card)
    assert (
        read.precision == "auto" and read.sources == ("a",) and read.optimizer == "rmsprop"
    )  # float16 meant GPUs
    with pytest.raises(ValueError, match="at least one image"):
        TrainConfig(batch_size=2, workers=4)
    assert read.preprocessing == PreprocessConfig()


def test_the_full_search_space_covers_the_recipe_and_the_paper_space_fixes_it():
    full, paper = search_space(TuneSettings()), search_space(TuneSettings(space="paper"))
    assert set(RECIPE_CHOICES) <= set(full) and not set(RECIPE_CHOICES) & set(paper)
    trial = {
        "learning_rate": 1e-3,
        "rotation": 1.0,
        "zoom": 0.0,
        "shift": 0.0,
        "brightness": 0.0,
        "contrast": 0.0,
        "horizontal_flip": False,
    }
    paper_config = trial_train_config(trial, TuneSettings(space="paper", patience=3))
    assert (paper_config.optimizer, paper_config.architecture, paper_config.sampling) == (
        "rmsprop",
        "lxn",
        "weighted",
    )
    assert paper_config.patience == 3
    searched = trial_train_config(
        {
            **trial,
            "optimizer": "adamw",
            "schedule": "cosine",
            "architecture": "lxn-bn",
            "sampling": "source-balanced",
            "equalization": "clahe",
            "trim_borders": True,
        },
        TuneSettings(),
    )
    assert searched.preprocessing == PreprocessConfig(trim_borders=True, equalization="clahe")
    assert searched.warmup_epochs >= 1 and searched.architecture == "lxn-bn"
    with pytest.raises(ValueError, match="space must be one of"):
        TuneSettings(space="huge")


def test_a_collapsed_trial_is_counted_and_never_the_best():
    """trial_rows over what Tune's ResultGrid holds: the collapsed trial's early epochs scored higher
    than the other trial, yet it is COLLAPSED, not a candidate."""
    from types import SimpleNamespace

    import pandas as pd

    from lxn_ray.tuning.results import choose_best, trial_rows

    def result(trial_id, objectives, collapsed):
        frame = pd.DataFrame(
            {
                "epoch": range(1, len(objectives) + 1),
                "val_objective": objectives,
                "collapsed": collapsed,
            }
        )
        return SimpleNamespace(
            metrics_dataframe=frame,
            metrics={"trial_id": trial_id, "time_total_s": 1.0},
            error=None,
            config={"learning_rate": 1e-3},
            path=f"/x/run_{trial_id}_0",
        )

    rows = trial_rows(
        [result("aaaaaaaa", [0.61, 0.0], [False, True]), result("bbbbbbbb", [0.52, 0.55], [False, False])],
        TuneSettings(epochs=2),
    )
    by_id = {row["trial_id"]: row for row in rows}
    assert by_id["aaaaaaaa"]["status"] == "COLLAPSED" and by_id["aaaaaaaa"]["objective_best"] == 0.61
    assert by_id["bbbbbbbb"]["status"] == "COMPLETED" and by_id["bbbbbbbb"]["objective_best"] == 0.55
    assert choose_best(rows)["trial_id"] == "bbbbbbbb"
    with pytest.raises(RuntimeError, match="1 collapsed"):
        choose_best([by_id["aaaaaaaa"]])


def test_a_collapsed_challenger_is_never_promoted():
    from lxn_ray.evaluation.promotion import decide

    evaluation = {
        "collapsed": True,
        "shortcut": {"fired": False},
        "difference": 0.3,
        "difference_ci": [0.2, 0.4],
        "basis": "pooled AUC",
        "n": 100,
        "challenger": {"auc": 0.8, "auc_ci": [0.7, 0.9]},
    }
    promoted, reason = decide(evaluation, "new", None, margin=None)
    assert not promoted and "collapsed" in reason
    assert decide({**evaluation, "collapsed": False}, "new", "old", margin=None)[0]


@pytest.mark.parametrize("champion", [None, "old"])
@pytest.mark.parametrize("auc_ci", [[0.33, 0.62], None])
def test_a_challenger_no_better_than_chance_is_never_promoted(champion, auc_ci):
    """The first model included: an interval that includes 0.5 (or no test AUC) keeps it a candidate."""
    from lxn_ray.evaluation.promotion import decide

    evaluation = {
        "collapsed": False,
        "shortcut": {"fired": False},
        "difference": 0.3,
        "difference_ci": [0.2, 0.4],
        "basis": "pooled AUC",
        "n": 100,
        "challenger": {"auc": 0.477 if auc_ci else None, "auc_ci": auc_ci},
    }
    for margin in (None, 0.05):
        promoted, reason = decide(evaluation, "new", champion, margin=margin)
        assert not promoted
        assert "new is no better than chance" in reason and "`registry promote new`" in reason


def test_auc_standard_error_is_hanley_and_mcneil():
    from lxn_ray.evaluation.metrics import auc_standard_error

    # Hanley & McNeil (1982), eq. 2 worked by hand: A 0.8 on 50 positives and 50 negatives.
    assert auc_standard_error(0.8, 50, 50) == pytest.approx(0.0445, abs=5e-4)
    assert auc_standard_error(0.75, 45, 15) > 0.06 > auc_standard_error(0.75, 300, 300)
    assert auc_standard_error(0.75, 10, 0) == float("inf")


def test_a_val_split_too_small_to_rank_trials_publishes_the_longest_trained_of_the_tied():
    """The issue's case: an epoch-1 peak on a val split with 15 negatives does not win over a trial that
    trained every epoch and scored within one standard error of it; on a large val split it does."""
    from lxn_ray.tuning.results import select_best, val_resolution

    def row(trial_id, best, epochs, status):
        return {
            "trial_id": trial_id,
            "objective_best": best,
            "epochs_run": epochs,
            "status": status,
            "seconds": 10.0,
            "config": {},
        }

    rows = [
        row("aaaaaaaa", 0.703, 1, "STOPPED"),
        row("bbbbbbbb", 0.66, 3, "COMPLETED"),
        row("cccccccc", 0.52, 3, "COMPLETED"),
    ]
    small = select_best(rows, positives=45, negatives=15)
    assert small.best["trial_id"] == "bbbbbbbb" and small.tied == ["aaaaaaaa", "bbbbbbbb"]
    assert small.as_dict()["rule"] == "one standard error" and small.tolerance > 0.06
    large = select_best(rows, positives=400, negatives=400)
    assert large.best["trial_id"] == "aaaaaaaa" and large.tolerance == 0.0 and large.tied == ["aaaaaaaa"]
    assert "too few to rank trials" in val_resolution(45, 15) and "one-standard-error rule" in val_resolution(
        45, 15
    )
    assert "the best trial is the highest val objective" in val_resolution(400, 400)
