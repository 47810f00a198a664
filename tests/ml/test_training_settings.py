"""CandidateSettings: one resolution of a candidate's training settings, one range per field."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest

from ml.config import (
    BATCH_SIZE_RANGE,
    EPOCHS_RANGE,
    IMAGE_SIZE_RANGE,
    LEARNING_RATE_RANGE,
    TrainConfig,
)
from ml.errors import ConfigError, UnknownArchitectureError
from ml.training.settings import CandidateSettings


def _config(options: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> TrainConfig:
    return TrainConfig(candidates=("scratch_small",), candidate_options=options or {}, **kwargs)


# --- precedence ----------------------------------------------------------------------------------


def test_config_values_apply_when_the_candidate_sets_none() -> None:
    config = _config(epochs=5, image_size=64, batch_size=16, learning_rate=0.01, augment=False, seed=7,
                     label_smoothing=0.1, early_stopping_patience=4, class_weight_threshold=2.0)

    s = CandidateSettings.for_candidate(config, "scratch_small")

    assert (s.image_size, s.batch_size, s.epochs, s.learning_rate) == (64, 16, 5, 0.01)
    assert s.augment is None and s.parent is None and s.transfer is None
    assert (s.seed, s.label_smoothing, s.early_stopping_patience, s.class_weight_threshold) == (7, 0.1, 4, 2.0)
    assert s.kind == "scratch" and s.name == "small" and s.architecture == "scratch_small" and s.preprocess == "tf"
    assert dict(s.scratch_options) == {"depth": 4, "width": 16, "residual": False, "dropout": 0.2,
                                       "head_dropout": 0.4, "l2": 1e-4}


def test_candidate_options_win_over_the_config() -> None:
    options = {"image_size": 48, "batch_size": 4, "epochs": 2, "learning_rate": 0.05, "depth": 3,
               "augmentation": {"rotation": 0.2}}
    config = _config({"scratch_small": options}, augment=False, image_size=96)

    s = CandidateSettings.for_candidate(config, "scratch_small")

    assert (s.image_size, s.batch_size, s.epochs, s.learning_rate) == (48, 4, 2, 0.05)
    assert s.augment is None  # augment stays the config's False: 'augmentation' tunes, 'augment' switches
    assert s.scratch_options["depth"] == 3 and "image_size" not in s.scratch_options
    assert dict(s.options) == options
    on = CandidateSettings.for_candidate(_config({"scratch_small": {**options, "augment": True}}), "scratch_small")
    assert on.augment is not None and on.augment.rotation == 0.2


def test_transfer_candidate_settings() -> None:
    config = _config({"transfer_mobilenet": {"alpha": 0.25, "head_units": 8, "augment": False}}, image_size=64)

    s = CandidateSettings.for_candidate(config, "transfer_mobilenet")

    assert s.kind == "transfer" and s.name == "mobilenet" and s.architecture == "mobilenet"
    assert s.transfer is not None and (s.alpha, s.transfer.head_units, s.transfer.dropout) == (0.25, 8, 0.2)
    assert s.preprocess == "tf" and s.scratch_options is None and s.augment is None and s.image_size == 64


def test_finetune_overrides() -> None:
    config = _config(
        {
            "transfer_mobilenet": {"alpha": 0.25, "epochs": 9, "learning_rate": 0.02, "batch_size": 12,
                                   "augment": False, "image_size": 64},
            "finetune_mobilenet": {},
        },
        epochs=6, learning_rate=0.01, finetune_epochs=2, finetune_lr_factor=0.5, batch_size=32,
    )

    s = CandidateSettings.for_finetune(config, "transfer_mobilenet", 64)

    assert s.candidate == "finetune_mobilenet" and s.kind == "finetune" and s.parent == "transfer_mobilenet"
    # Its own schedule: the parent's epochs/learning_rate do not carry over ...
    assert s.epochs == 2 and s.learning_rate == pytest.approx(0.005)
    # ... but its options do (batch size, augmentation, head options).
    assert s.batch_size == 12 and s.augment is None and s.alpha == 0.25
    assert s.image_size == 64 and s.preprocess == "tf" and s.architecture == "mobilenet"


def test_finetune_own_options_win_and_the_parent_image_size_is_kept(caplog: pytest.LogCaptureFixture) -> None:
    config = _config({
        "transfer_mobilenet": {"batch_size": 12, "augment": False},
        "finetune_mobilenet": {"epochs": 4, "learning_rate": 0.003, "batch_size": 6, "augment": True,
                               "image_size": 128},
    })

    with caplog.at_level(logging.WARNING, logger="ml.training.settings"):
        s = CandidateSettings.for_finetune(config, "transfer_mobilenet", 96)

    assert (s.epochs, s.learning_rate, s.batch_size) == (4, 0.003, 6) and s.augment is not None
    assert s.image_size == 96  # the model it continues was built at 96 px
    assert any("finetune_mobilenet.image_size=128 is ignored" in r.getMessage() for r in caplog.records)


def test_settings_are_frozen() -> None:
    s = CandidateSettings.for_candidate(_config({"scratch_small": {"depth": 3}}), "scratch_small")

    with pytest.raises(dataclasses.FrozenInstanceError):
        s.epochs = 99  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.options["depth"] = 5  # type: ignore[index]
    with pytest.raises(TypeError):
        s.scratch_options["depth"] = 5  # type: ignore[index]


# --- validation: one rule per field, named by the setting that supplied the value -------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"image_size": 16}, r"train\.candidate_options\.scratch_small\.image_size must be in \[32, 600\], got 16"),
        ({"image_size": 601}, r"\.image_size must be in \[32, 600\], got 601"),
        ({"image_size": "64"}, r"\.image_size must be an integer in \[32, 600\], got '64'"),
        ({"image_size": 64.5}, r"\.image_size must be an integer in \[32, 600\], got 64\.5"),
        ({"batch_size": 0}, r"train\.candidate_options\.scratch_small\.batch_size must be in \[1, 4096\], got 0"),
        ({"batch_size": True}, r"\.batch_size must be an integer in \[1, 4096\], got True"),
        ({"epochs": 0}, r"train\.candidate_options\.scratch_small\.epochs must be in \[1, 1000\], got 0"),
        ({"epochs": 1001}, r"\.epochs must be in \[1, 1000\], got 1001"),
        ({"learning_rate": 1.0}, r"train\.candidate_options\.scratch_small\.learning_rate must be a number in "
                                 r"\(0, 1\), got 1\.0"),
        ({"learning_rate": 0}, r"\.learning_rate must be a number in \(0, 1\), got 0"),
        ({"augmentation": {"rotation": 1.5}}, r"train\.candidate_options\.scratch_small: augmentation\.rotation "
                                              r"must be in \[0, 1\)"),
    ],
)
def test_each_field_is_validated_with_the_setting_named(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CandidateSettings.for_candidate(_config({"scratch_small": options}), "scratch_small")


@pytest.mark.parametrize(
    ("candidate", "options", "message"),
    [
        ("scratch_small", {"depht": 3}, r"train\.candidate_options\.scratch_small: unknown option 'depht' for "
                                         r"scratch_small; allowed: \[.*'depth'.*'image_size'"),
        ("transfer_mobilenet", {"alfa": 0.5}, r"train\.candidate_options\.transfer_mobilenet: unknown options "
                                               r"\['alfa'\] .*allowed: \[.*'alpha'"),
        ("scratch_small", {"augmentation": {"hue": 0.1}}, r"unknown augmentation keys \['hue'\]; allowed: "),
        ("transfer_resnet50_v2", {"alpha": 0.5}, r"transfer_resnet50_v2: architecture 'resnet50_v2' has no 'alpha'"),
    ],
)
def test_unknown_option_keys_name_the_allowed_ones(candidate: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CandidateSettings.for_candidate(_config({candidate: options}), candidate)


def test_finetune_options_are_validated_too(tmp_path: Path) -> None:
    config = _config({"finetune_mobilenet": {"epochs": 0}})
    with pytest.raises(ConfigError, match=r"train\.candidate_options\.finetune_mobilenet\.epochs must be in"):
        CandidateSettings.for_finetune(config, "transfer_mobilenet", 64)
    with pytest.raises(ConfigError, match=r"finetune_mobilenet \(merged over train\.candidate_options\."
                                          r"transfer_mobilenet\): unknown options \['typo'\]"):
        CandidateSettings.for_finetune(_config({"transfer_mobilenet": {"typo": 1}}), "transfer_mobilenet", 64)
    # The parent's batch size is reported under the parent's name.
    with pytest.raises(ConfigError, match=r"train\.candidate_options\.transfer_mobilenet\.batch_size must be in"):
        CandidateSettings.for_finetune(_config({"transfer_mobilenet": {"batch_size": 0}}), "transfer_mobilenet", 64)
    with pytest.raises(ConfigError, match=rf"{tmp_path}/train_summary\.json image_size must be an integer"):
        CandidateSettings.for_finetune(_config(), "transfer_mobilenet", None, source=tmp_path)


def test_kinds_are_checked() -> None:
    with pytest.raises(ConfigError, match="finetune_candidate"):
        CandidateSettings.for_candidate(_config(), "finetune_mobilenet")
    with pytest.raises(ConfigError, match=r"only transfer candidates can be fine-tuned, /x holds 'scratch_small'"):
        CandidateSettings.for_finetune(_config(), "scratch_small", 64, source="/x")
    with pytest.raises(UnknownArchitectureError, match="known:"):
        CandidateSettings.for_candidate(_config(), "scratch_enormous")


def test_a_backbone_below_its_smallest_input_fails_before_training() -> None:
    config = _config({"transfer_inception_v3": {"image_size": 64}})
    with pytest.raises(ConfigError, match=r"train\.candidate_options\.transfer_inception_v3\.image_size: "
                                          r"architecture 'inception_v3' needs image_size >= 75"):
        CandidateSettings.for_candidate(config, "transfer_inception_v3")
    with pytest.raises(ConfigError, match=r"^train\.image_size: architecture 'inception_v3' needs"):
        CandidateSettings.for_candidate(_config(image_size=64), "transfer_inception_v3")


# --- config and training agree ---------------------------------------------------------------------


def _accepts(build: Any, *args: Any, **kwargs: Any) -> bool:
    try:
        build(*args, **kwargs)
    except ConfigError:
        return False
    return True


@pytest.mark.parametrize(
    ("key", "bounds", "values"),
    [
        ("image_size", IMAGE_SIZE_RANGE, [31, 32, 33, 96, 599, 600, 601, 8, 1024, 2048]),
        ("epochs", EPOCHS_RANGE, [0, 1, 2, 999, 1000, 1001]),
        ("batch_size", BATCH_SIZE_RANGE, [0, 1, 2, 4095, 4096, 4097]),
        ("learning_rate", LEARNING_RATE_RANGE, [0, 1e-9, 0.5, 0.999, 1, 1.5]),
    ],
)
def test_config_and_candidate_options_accept_the_same_values(
    key: str, bounds: tuple[float, float], values: list[float]
) -> None:
    """A value valid in train.<key> is valid in train.candidate_options.<candidate>.<key>, and the reverse
    (they once disagreed: image_size 32-600 in TrainConfig, 8-1024 in training, 8-2048 in the cache)."""
    for value in values:
        in_config = _accepts(TrainConfig, **{key: value})
        as_option = _accepts(CandidateSettings.for_candidate, _config({"scratch_small": {key: value}}), "scratch_small")
        assert in_config == as_option, f"{key}={value}: TrainConfig {in_config}, candidate option {as_option}"
        low, high = bounds
        inside = low <= value <= high if key != "learning_rate" else low < value < high
        assert in_config == inside, f"{key}={value}"
    assert IMAGE_SIZE_RANGE == (32, 600)


def test_train_config_checks_finetune_epochs_with_the_same_rule() -> None:
    # 0 used to fall through to train.epochs silently (`0 or ...`).
    with pytest.raises(ConfigError, match=r"train\.finetune_epochs must be in \[1, 1000\], got 0"):
        TrainConfig(finetune_epochs=0)
    assert TrainConfig(image_size=96.0).image_size == 96 and isinstance(TrainConfig(image_size=96.0).image_size, int)
