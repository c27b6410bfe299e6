"""One declaration per setting (lxn_ray.infra.settings) and the flags each command derives from it."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from lxn_ray.infra.settings import add_flags, from_args, help_of, setting


@dataclasses.dataclass(frozen=True)
class Inner:
    level: str = setting("none", help="how much", choices=("none", "some"))
    hidden: float = setting(0.5, help="no flag", flag=False)


@dataclasses.dataclass(frozen=True)
class Outer:
    size: int = setting(200, help="side in pixels")
    rate: float = setting(1e-4, help="learning rate", flag="--lr")
    sizes: tuple[int, ...] = setting((), help="comma-separated")
    gpu: bool = setting(False, help="use a GPU")
    fast: bool = setting(True, help="run slowly")
    limit: int | None = setting(None, help="at most this many")
    extra: Inner = setting(default_factory=Inner, help="nested, flattened")
    jitter: Inner = setting(default_factory=lambda: Inner("some"), help="off", flag="--plain", const=Inner())
    rows: int = setting(25, help="rows", flag=("--rows", "--lines"))
    internal: int = setting(3, help="never a flag", flag=False)


def _parse(argv: list[str], **options) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser, Outer, **options)
    return parser.parse_args(argv)


def test_flags_round_trip_to_the_declared_defaults():
    assert from_args(Outer, _parse([])) == Outer()
    parser = argparse.ArgumentParser()
    add_flags(parser, Outer)
    flags = {option for action in parser._actions for option in action.option_strings}
    assert flags == {
        "-h", "--help", "--size", "--lr", "--sizes", "--gpu", "--no-fast", "--limit", "--level",
        "--plain", "--rows", "--lines",
    }  # fmt: skip


def test_every_kind_of_flag_is_parsed_back():
    argv = ["--size", "64", "--lr", "0.01", "--sizes", "8, 16", "--gpu", "--no-fast", "--limit", "3"]
    argv += ["--level", "some", "--plain", "--lines", "7"]
    outer = from_args(Outer, _parse(argv), internal=9)
    assert outer == Outer(
        size=64, rate=0.01, sizes=(8, 16), gpu=True, fast=False, limit=3, extra=Inner(level="some"),
        jitter=Inner(), rows=7, internal=9,
    )  # fmt: skip
    assert from_args(Outer, _parse(["--sizes", ""])).sizes == ()  # empty: not given


def test_bad_values_are_argparse_errors(capsys):
    for argv in (["--level", "lots"], ["--sizes", "8,x"], ["--size", "big"]):
        with pytest.raises(SystemExit) as exited:
            _parse(argv)
        assert exited.value.code == 2
    assert "'8,x' is not a comma-separated list of int" in capsys.readouterr().err


def test_a_command_overrides_defaults_help_and_order():
    parser = argparse.ArgumentParser()
    overrides = {"size": None, "gpu": None, "fast": None}
    add_flags(parser, Outer, only=("gpu", "fast", "size"), defaults=overrides, help={"size": "mine"})
    assert [a.dest for a in parser._actions[1:]] == ["gpu", "fast", "size"]
    assert parser._actions[3].help == "mine"
    assert {a.option_strings[0] for a in parser._actions[1:]} == {"--gpu", "--no-fast", "--size"}
    unset = parser.parse_args([])
    assert (unset.size, unset.gpu, unset.fast) == (None, None, None)  # None: not given
    assert from_args(Outer, unset) == Outer()  # ... which is the declared default
    given = parser.parse_args(["--gpu", "--no-fast", "--size", "9"])
    assert (given.gpu, given.fast, given.size) == (True, False, 9)
    with pytest.raises(KeyError):
        add_flags(argparse.ArgumentParser(), Outer, only=("internal",))


def test_help_of_shares_a_declared_text():
    assert help_of(Outer, "rate") == "learning rate"
    assert help_of(Outer, "extra") == "nested, flattened"


# -- the commands -------------------------------------------------------------------------------------
def test_train_and_loso_flags_build_the_train_config():
    from lxn_ray.cli import loso, train
    from lxn_ray.images.preprocess import AugmentConfig, PreprocessConfig
    from lxn_ray.training.config import TrainConfig

    assert from_args(TrainConfig, train.make_parser().parse_args([])) == TrainConfig()
    argv = ["--lr", "0.01", "--trim-borders", "--equalization", "clahe", "--no-augment", "--seed", "4"]
    config = from_args(TrainConfig, train.make_parser().parse_args([*argv, "--workers", "2", "--gpu"]))
    assert config == TrainConfig(
        learning_rate=0.01, seed=4, workers=2, use_gpu=True, augment=AugmentConfig(),
        preprocessing=PreprocessConfig(trim_borders=True, equalization="clahe"),
    )  # fmt: skip
    assert from_args(TrainConfig, loso.make_parser().parse_args(argv)) == dataclasses.replace(
        config, workers=1, use_gpu=False
    )
    with pytest.raises(SystemExit):
        loso.make_parser().parse_args(["--workers", "2"])  # one worker per fold


def test_tune_defaults_are_its_own_and_the_paper_s():
    from lxn_ray.cli.tune import make_parser, settings

    plain = settings(make_parser().parse_args([]))
    assert (plain.image_size, plain.epochs, plain.patience, plain.space) == (128, 20, 5, "full")
    paper = settings(make_parser().parse_args(["--paper", "--epochs", "3"]))
    assert (paper.image_size, paper.epochs, paper.patience, paper.space) == (200, 3, 0, "paper")
    searched = settings(make_parser().parse_args(["--image-sizes", "64,128", "--no-asha"]))
    assert searched.image_sizes == (64, 128) and searched.asha is False


def test_retrain_training_flags_default_to_the_champion_s():
    from lxn_ray.cli.retrain import make_parser, settings
    from lxn_ray.retraining.settings import TrainOverrides

    chosen = settings(make_parser().parse_args(["--once", "--source", "/a", "--lock-ttl", "90s"]))
    assert chosen.overrides == TrainOverrides() and chosen.lock_ttl_s == 90.0 and chosen.wait_for_lock
    argv = ["--once", "--source", "/a", "--lr", "0.01", "--gpu", "--min-changed-rows", "3", "--no-wait"]
    chosen = settings(make_parser().parse_args(argv))
    assert chosen.overrides == TrainOverrides(learning_rate=0.01, use_gpu=True)
    assert chosen.min_new_images == 3 and not chosen.wait_for_lock


def test_every_command_s_help_lists_its_documented_flags(capsys):
    from lxn_ray.cli.main import COMMANDS, main

    documented = {
        "ingest": ["--source", "--sources", "--ref", "--source-name", "--frontal-views"],
        "train": ["--dataset-version", "--workers", "--gpu", "--lr", "--no-augment", "--fresh", "--lungs"],
        "tune": ["--num-samples", "--image-sizes", "--paper", "--no-asha", "--resume", "--space", "--lungs"],
        "lungs": ["--masks", "--films", "--epochs", "--image-size"],
        "evaluate": ["--model", "--source", "--sources", "--task"],
        "loso": ["--dataset-version", "--task", "--trim-borders", "--stall-timeout-s"],
        "retrain": ["--once", "--every", "--min-new-images", "--min-changed-rows", "--lock-ttl", "--no-wait"],
        "registry": ["list", "show", "promote", "rollback"],
        "serve": ["--model", "--port", "--no-auth", "--mint-key", "--detach", "--max-batch-size"],
        "monitor": ["--model", "--window", "--hours", "--min-rows", "--psi", "--refresh-reference"],
    }
    assert set(documented) == set(COMMANDS)
    for command, flags in documented.items():
        with pytest.raises(SystemExit) as exited:
            main([command, "--help"])
        out = capsys.readouterr().out
        assert exited.value.code == 0 and f"usage: lxn {command}" in out
        assert all(flag in out for flag in ["--storage", "--report", "--verbose", *flags]), command
