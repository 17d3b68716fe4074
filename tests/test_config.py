"""The config language: parsing, defaults, overrides, round trip, and every bad-input case."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from cycdata.config import (
    ConfigError,
    apply_overrides,
    config_to_dict,
    dump_config,
    load_config,
    parse_config,
)
from cycdata.plan import Plan
from cycdata.schedules import Constant, Cyclical

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "full.yaml"


def test_defaults_are_the_default_recipe() -> None:
    config = parse_config({})
    assert config.data.dataset == "mnist5k"
    assert isinstance(config.optim.weight_decay, Cyclical)  # CWD on
    assert isinstance(config.temperature, Cyclical)  # CST on
    assert config.grad_clip is not None and isinstance(config.grad_clip.threshold, Cyclical)  # CGC on
    assert config.self_paced is None and config.semi_supervised is None


def test_example_config_parses_with_every_knob() -> None:
    config = load_config(EXAMPLE)
    assert config.epochs == 30
    assert config.data.batch_size == Cyclical(256, 64, factor=2.0)
    assert config.optim.weight_decay == Cyclical(1e-5, 8e-5, factor=2.0)
    assert config.grad_clip is not None and config.grad_clip.mode == "norm"
    assert config.self_paced is not None and config.self_paced.keep == Cyclical(0.5, 1.0)
    assert config.semi_supervised is not None and config.semi_supervised.ratio == Cyclical(0.0, 7.0)
    plan = Plan.from_config(config)
    assert set(plan.names) == {
        "data.batch_size",
        "optim.lr",
        "optim.weight_decay",
        "temperature",
        "grad_clip",
        "augment.strength",
        "self_paced.keep",
        "semi_supervised.ratio",
    }


def test_knob_forms() -> None:
    config = parse_config(
        {
            "cyclical_factor": 4,
            "temperature": {"easy": 0.5, "hard": 2, "factor": 3, "shape": "cosine"},
            "optim": {"weight_decay": "1e-5"},  # YAML 1.1 reads 1e-5 as a string; accepted as a number
            "grad_clip": {"value": 1.0, "mode": "agc"},
            "data": {"batch_size": {"easy": 256, "hard": 64}},
        }
    )
    assert config.temperature == Cyclical(0.5, 2.0, factor=3.0, shape="cosine")
    assert config.optim.weight_decay == Constant(1e-5)
    assert config.grad_clip is not None and config.grad_clip.threshold == Constant(1.0)
    assert config.grad_clip.mode == "agc"
    assert config.data.batch_size == Cyclical(256, 64, factor=4.0)  # the shared factor


def test_null_turns_features_off() -> None:
    config = parse_config({"temperature": None, "grad_clip": None, "self_paced": None})
    assert config.temperature is None and config.grad_clip is None
    assert "temperature" not in Plan.from_config(config).names


def test_overrides_use_dotted_keys_and_yaml_values() -> None:
    raw = apply_overrides(
        {},
        [
            "epochs=5",
            "optim.lr=0.05",
            "temperature.easy=0.7",
            "temperature.hard=1.5",
            "data.batch_size={easy: 128, hard: 32}",
            "self_paced.keep=0.8",
        ],
    )
    config = parse_config(raw)
    assert config.epochs == 5 and config.optim.lr == Constant(0.05)
    assert config.temperature == Cyclical(0.7, 1.5)
    assert config.data.batch_size == Cyclical(128, 32)
    assert config.self_paced is not None and config.self_paced.keep == Constant(0.8)
    # A constant knob can be turned into a cyclical one key by key.
    config = parse_config(apply_overrides({"temperature": 1.0}, ["temperature.easy=0.5", "temperature.hard=2"]))
    assert config.temperature == Cyclical(0.5, 2.0)


def test_round_trip_and_pickle() -> None:
    config = load_config(EXAMPLE)
    assert parse_config(config_to_dict(config)) == config
    assert load_config(None) == parse_config(config_to_dict(load_config(None)))
    assert pickle.loads(pickle.dumps(config)) == config
    assert "weight_decay" in dump_config(config)


# Every bad-input case of the issue: (raw config, the key named, words the message must contain).
BAD_CONFIGS = [
    ({"epochs": "ten"}, "epochs", "expected an integer"),
    ({"epochs": 2.5}, "epochs", "expected an integer"),
    ({"epochs": 1}, "epochs", "must be >= 2"),
    ({"cyclical_factor": 0.5}, "cyclical_factor", "must be >= 1"),
    ({"temperature": {"easy": 0.5, "hard": 2, "factor": 0.9}}, "temperature.factor", "must be >= 1"),
    ({"optim": {"lr": 0}}, "optim.lr", "must be > 0"),
    ({"optim": {"lr": -0.1}}, "optim.lr", "must be > 0"),
    ({"optim": {"weight_decay": {"easy": -1e-5, "hard": 1e-4}}}, "optim.weight_decay.easy", "must be >= 0"),
    ({"optim": {"wieght_decay": 0.1}}, "optim.wieght_decay", "did you mean 'optim.weight_decay'"),
    ({"optim": {"momentum": 1.0}}, "optim.momentum", "must be >= 0 and < 1"),
    ({"optim": {"name": "SGD!"}}, "optim.name", "timm optimizer name"),
    ({"data": {"batch_size": 0}}, "data.batch_size", "must be > 0"),
    ({"data": {"batch_size": {"easy": 256.5, "hard": 64}}}, "data.batch_size.easy", "expected an integer"),
    ({"data": {"batch_size": {"easy": 256}}}, "data.batch_size", "missing hard"),
    ({"temperature": {"hard": 2.0}}, "temperature", "missing easy"),
    ({"temperature": 0}, "temperature", "must be > 0"),
    ({"temperature": {"easy": -0.5, "hard": 2.0}}, "temperature.easy", "must be > 0"),
    ({"temperature": {"easy": 0.5, "hard": 2.0, "hardd": 1}}, "temperature.hardd", "did you mean 'temperature.hard'"),
    ({"grad_clip": {"easy": 0.5, "hard": 2.0, "mode": "l2"}}, "grad_clip.mode", "norm, value, agc"),
    ({"self_paced": {"keep": 1.5}}, "self_paced.keep", "must be > 0 and <= 1"),
    ({"self_paced": {"keep": {"easy": 0, "hard": 1}}}, "self_paced.keep.easy", "must be > 0 and <= 1"),
    ({"self_paced": {"weighting": "soft"}}, "self_paced.weighting", "hard, linear, log, mixture"),
    ({"self_paced": {"threshold": 1.0}}, "self_paced", "exactly one of"),
    ({"augment": {"strength": {"easy": 0.0, "hard": 1.5}}}, "augment.strength.hard", "must be >= 0 and <= 1"),
    ({"augment": {"ladder": "defualt"}}, "augment.ladder", "did you mean 'default'"),
    ({"data": {"dataset": "imagenet"}}, "data.dataset", "unknown dataset scheme 'imagenet'"),
    ({"data": {"dataset": "mnist"}}, "data.dataset", "did you mean 'mnist5k'"),
    ({"data": {"dataset": "cifar10"}}, "data.dataset", "needs a path"),
    ({"data": {"dataset": "synthetic:abc"}}, "data.dataset", "positive sample count"),
    ({"semi_supervised": {"labeled": -3}}, "semi_supervised.labeled", "must be > 0"),
    ({"semi_supervised": {"ratio": {"easy": 0, "hard": -1}}}, "semi_supervised.ratio.hard", "must be >= 0"),
    ({"loss": {"name": "focal"}}, "loss.name", "ce, cyclical_focal"),
    ({"optim": 3}, "optim", "expected a mapping"),
    ({"modle": "resnet18"}, "modle", "did you mean 'model'"),
    ({"runtime": {"amp": "yes"}}, "runtime.amp", "expected true or false"),
    ({"optim": {"lr": float("nan")}}, "optim.lr", "finite"),
]


@pytest.mark.parametrize(("raw", "key", "words"), BAD_CONFIGS, ids=[case[1] for case in BAD_CONFIGS])
def test_bad_config_names_key_and_fix(raw: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    message = str(caught.value)
    assert caught.value.key == key
    assert message.startswith(f"{key}: ")
    assert words in message
    assert "\n" not in message


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 10\noptim:\n  lr: 0.1\n   momentum: 0.9\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*bad.yaml at line 4"):
        load_config(path)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["=3"])
    with pytest.raises(ConfigError, match="cannot set a sub-key"):
        apply_overrides({"model": "resnet18"}, ["model.depth=3"])


def test_one_end_given_alone_keeps_the_other_from_the_default_recipe() -> None:
    defaults = load_config(None)
    config = load_config(None, ["temperature.easy=0.3", "data.batch_size.hard=64", "grad_clip.hard=5"])
    assert config.temperature == Cyclical(0.3, defaults.temperature.hard, factor=defaults.temperature.factor)
    assert config.data.batch_size == Cyclical(defaults.data.batch_size.value, 64, factor=2.0)
    assert config.grad_clip is not None and config.grad_clip.threshold.hard == 5
    assert config.grad_clip.threshold.easy == defaults.grad_clip.threshold.easy


def test_one_end_overridden_keeps_the_config_files_other_end(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("temperature: 1.5\ngrad_clip: {easy: 0.25, hard: 8, mode: value}\n")
    config = load_config(path, ["temperature.easy=0.3", "grad_clip.easy=0.5"])
    assert (config.temperature.easy, config.temperature.hard) == (0.3, 1.5)
    assert config.grad_clip is not None and config.grad_clip.mode == "value"
    assert (config.grad_clip.threshold.easy, config.grad_clip.threshold.hard) == (0.5, 8)
    # In a file, a knob is written whole: one end alone is still refused there.
    path.write_text("temperature: {hard: 2.0}\n")
    with pytest.raises(ConfigError, match="missing easy"):
        load_config(path)


@pytest.mark.parametrize("override", ["temperature.easy=0", "grad_clip=0", "temperature=0"])
def test_a_zero_that_means_off_in_the_reference_names_null(override: str) -> None:
    knob = override.split(".")[0].split("=")[0]
    with pytest.raises(ConfigError, match=f"to turn {knob} off, set {knob}: null"):
        load_config(None, [override])
