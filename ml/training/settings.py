"""Per-candidate training settings, resolved once from `TrainConfig` and the candidate's options.

Precedence, field by field: the candidate's own option (``train.candidate_options.<candidate>``),
then the config value. A fine-tuned candidate ``finetune_<arch>`` starts from a trained
``transfer_<arch>``: its own options win over its parent's (augmentation, batch size, head
options), it trains for ``train.finetune_epochs`` epochs at ``train.learning_rate *
train.finetune_lr_factor`` unless its own options set ``epochs``/``learning_rate`` (the parent's do
not carry over: fine-tuning is a different schedule), and it always keeps the parent's image size,
because the model it continues was built for it.

A transfer candidate's frozen phase trains its head on cached features whenever it can: on the
bottleneck cache without augmentation, on the augmented bank (`ml.training.bank`) with it
(``frozen_phase: bank``, the default, ``bank_views`` augmented views per image), or through the
backbone every epoch (``frozen_phase: backbone``). A head on features trains for
``train.head_epochs`` (early stopping ends it, after ``train.head_early_stopping_patience``
epochs without a lower val loss) at ``train.head_learning_rate``, unless the candidate's own
``epochs``/``learning_rate`` are set.

Each field is validated here, once, with the ranges and functions `TrainConfig` uses
(`ml.config.IMAGE_SIZE_RANGE` and friends), and a bad value is reported under the name of the
setting that supplied it (``train.candidate_options.scratch_small.image_size must be in [32,
600], got 16``). Unknown option keys raise with the allowed ones. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from ml.config import (
    BATCH_SIZE_RANGE,
    EPOCHS_RANGE,
    IMAGE_SIZE_RANGE,
    LEARNING_RATE_RANGE,
    TrainConfig,
    check_int_setting,
    check_rate_setting,
)
from ml.errors import ConfigError
from ml.models.registry import (
    TRAINING_OPTION_KEYS,
    ArchitectureSpec,
    get_architecture,
    get_scratch_variant,
    parse_candidate,
)
from ml.models.scratch import SCRATCH_PREPROCESS
from ml.models.transfer import TransferOptions, transfer_options
from ml.training.input_pipeline import AugmentConfig

log = logging.getLogger(__name__)

FROZEN_PHASES = ("bank", "backbone")
# Augmented views per training image in the bank (plus the un-augmented one). Measured on
# animals3 (MobileNet v1 a0.25 ImageNet, 224 px): see benchmarks/README.md, `bottleneck_augmented`.
# Fused-warp views (bank v2), 2026-12-02, one process: 2 / 3 / 5 / 8 views gave val accuracy 0.937 /
# 0.962 / 0.962 / 0.962, test 0.956 / 0.947 / 0.929 / 0.947 (n = 113: 1 image = 0.9 points, noise) at
# 22.4 (first run: traces) / 15.8 / 21.0 / 28.9 s of frozen phase: 3 is the cheapest at the best val accuracy.
DEFAULT_BANK_VIEWS = 3
BANK_VIEWS_RANGE = (1, 64)

__all__ = ["CandidateSettings", "IMAGE_SIZE_RANGE"]

# (options, the setting name they come from), most specific first.
_Sources = Sequence[tuple[Mapping[str, Any], str]]
_T = TypeVar("_T")


@dataclass(frozen=True)
class CandidateSettings:
    """Everything training reads about one candidate, validated.

    Build it with `for_candidate` (scratch and transfer) or `for_finetune`.

    Attributes:
        candidate: ``scratch_<variant>``, ``transfer_<arch>`` or ``finetune_<arch>``.
        kind: ``scratch``, ``transfer`` or ``finetune``.
        name: The scratch variant or backbone architecture.
        image_size: Square input size, pixels.
        batch_size: Images per training step.
        epochs: Most epochs to train (early stopping may end sooner).
        learning_rate: Adam's initial learning rate.
        augment: Distortions of training images, or None when augmentation is off.
        seed: Python/NumPy/TensorFlow seed, also of shuffling and augmentation.
        label_smoothing: Of the cross-entropy loss.
        early_stopping_patience: Epochs without improvement before training stops.
        class_weight_threshold: Class-count ratio above which classes are re-weighted.
        options: The options as configured (a fine-tuned candidate's merged over its parent's),
            recorded in train_summary.json.
        scratch_options: A scratch candidate's model options with the variant's defaults filled
            in; None for the other kinds.
        transfer: A transfer or fine-tuned candidate's head/backbone options; None for scratch.
        parent: The transfer candidate a fine-tuned one continues; None otherwise.
        frozen_phase: ``bank`` (augmented features, computed once) or ``backbone`` (every
            augmented image through the frozen backbone every epoch); used with augmentation on.
        bank_views: Augmented views per training image in the bank.
    """

    candidate: str
    kind: str
    name: str
    image_size: int
    batch_size: int
    epochs: int
    learning_rate: float
    augment: AugmentConfig | None
    seed: int
    label_smoothing: float
    early_stopping_patience: int
    class_weight_threshold: float
    options: Mapping[str, Any] = field(default_factory=dict)
    scratch_options: Mapping[str, Any] | None = None
    transfer: TransferOptions | None = None
    parent: str | None = None
    frozen_phase: str = "bank"
    bank_views: int = DEFAULT_BANK_VIEWS

    def __post_init__(self) -> None:
        # Read-only views: a frozen dataclass would still let a caller mutate a dict field.
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        if self.scratch_options is not None:
            object.__setattr__(self, "scratch_options", MappingProxyType(dict(self.scratch_options)))

    @property
    def head_on_features(self) -> str | None:
        """What a transfer candidate's head trains on: ``bottlenecks``, ``bank``, or None (images)."""
        if self.kind != "transfer":
            return None
        if self.augment is None:
            return "bottlenecks"
        return "bank" if self.frozen_phase == "bank" else None

    @property
    def spec(self) -> ArchitectureSpec:
        """The backbone entry of a transfer or fine-tuned candidate."""
        if self.kind == "scratch":
            raise ConfigError(f"{self.candidate} is a from-scratch CNN: it has no backbone architecture")
        return get_architecture(self.name)

    @property
    def alpha(self) -> float | None:
        """The MobileNet width multiplier of a transfer or fine-tuned candidate (None: none or scratch)."""
        return self.transfer.alpha if self.transfer is not None else None

    @property
    def architecture(self) -> str:
        """What preprocessing.json and train_summary.json call the model: the candidate name of a
        scratch CNN, the backbone architecture otherwise."""
        return self.candidate if self.kind == "scratch" else self.name

    @property
    def preprocess(self) -> str:
        """The ``preprocess_input`` mode inside the model (``tf`` for scratch CNNs)."""
        return SCRATCH_PREPROCESS if self.kind == "scratch" else self.spec.preprocess

    @classmethod
    def for_candidate(cls, config: TrainConfig, candidate: str) -> CandidateSettings:
        """Settings of a ``scratch_*`` or ``transfer_*`` candidate.

        Raises:
            UnknownArchitectureError: the name is not in the registry.
            ConfigError: a ``finetune_*`` name (see `for_finetune`), an unknown option key, or a
                value outside its range, named by the setting it came from.
        """
        kind, name = parse_candidate(candidate)
        if kind == "finetune":
            raise ConfigError(
                f"{candidate} is made by ml.training.finetune.finetune_candidate from a trained "
                "transfer candidate, not by train_candidate"
            )
        own = config.options_for(candidate)
        where = f"train.candidate_options.{candidate}"
        sources: _Sources = [(own, where)]
        size_value, size_name = _pick("image_size", sources, config.image_size, "train.image_size")
        image_size = check_int_setting(size_name, size_value, IMAGE_SIZE_RANGE)
        scratch, transfer = None, None
        if kind == "scratch":
            model_options = {k: v for k, v in own.items() if k not in TRAINING_OPTION_KEYS}
            scratch = _prefixed(where, lambda: get_scratch_variant(name).resolve_options(model_options))
        else:
            transfer = _prefixed(where, lambda: transfer_options(name, own))
            # Below a backbone's smallest input (InceptionV3: 75 px) Keras would fail only when building.
            _prefixed(size_name, lambda: get_architecture(name).check_size(image_size))
        augment = _prefixed(where, lambda: AugmentConfig.from_options(own, default_on=config.augment))
        phase = {"frozen_phase": "bank", "bank_views": DEFAULT_BANK_VIEWS}
        if kind == "transfer":
            phase = _frozen_phase(own, where)
        on_features = kind == "transfer" and (augment is None or phase["frozen_phase"] == "bank")
        epochs_default = (config.head_epochs, "train.head_epochs") if on_features else (config.epochs, "train.epochs")
        rate_default = (
            (config.head_learning_rate, "train.head_learning_rate") if on_features
            else (config.learning_rate, "train.learning_rate")
        )
        return cls(
            candidate=candidate,
            kind=kind,
            name=name,
            image_size=image_size,
            batch_size=_int("batch_size", sources, config.batch_size, "train.batch_size", BATCH_SIZE_RANGE),
            epochs=_int("epochs", sources, *epochs_default, EPOCHS_RANGE),
            learning_rate=_rate("learning_rate", sources, *rate_default),
            augment=augment,
            options=own,
            scratch_options=scratch,
            transfer=transfer,
            **phase,
            **{**_from_config(config), **(
                {"early_stopping_patience": config.head_early_stopping_patience} if on_features else {})},
        )

    @classmethod
    def for_finetune(
        cls, config: TrainConfig, parent: str, parent_image_size: Any, *, source: str | Path = "the parent"
    ) -> CandidateSettings:
        """Settings of ``finetune_<arch>``, continuing the trained transfer candidate `parent`.

        Args:
            config: Training settings.
            parent: The transfer candidate's name (from its train_summary.json).
            parent_image_size: The size it was trained at (its train_summary.json ``image_size``).
            source: Where the parent was read from (its folder), for error messages.

        Raises:
            UnknownArchitectureError: `parent` is not in the registry.
            ConfigError: `parent` is not a transfer candidate, an unknown option key, or a value
                outside its range, named by the setting it came from.
        """
        kind, name = parse_candidate(parent)
        if kind != "transfer":
            raise ConfigError(f"only transfer candidates can be fine-tuned, {source} holds {parent!r}")
        candidate = f"finetune_{name}"
        own, inherited = config.options_for(candidate), config.options_for(parent)
        own_where, parent_where = f"train.candidate_options.{candidate}", f"train.candidate_options.{parent}"
        options = {**inherited, **own}
        where = f"{own_where} (merged over {parent_where})"
        image_size = check_int_setting(f"{source}/train_summary.json image_size", parent_image_size, IMAGE_SIZE_RANGE)
        if "image_size" in own and own["image_size"] != image_size:
            log.warning("%s.image_size=%r is ignored: %s continues %s, which was trained at %d px",
                        own_where, own["image_size"], candidate, parent, image_size)
        own_only: _Sources = [(own, own_where)]
        finetune_lr = config.learning_rate * config.finetune_lr_factor
        return cls(
            candidate=candidate,
            kind="finetune",
            name=name,
            image_size=image_size,
            batch_size=_int("batch_size", [*own_only, (inherited, parent_where)], config.batch_size,
                            "train.batch_size", BATCH_SIZE_RANGE),
            epochs=_int("epochs", own_only, config.finetune_epochs, "train.finetune_epochs", EPOCHS_RANGE),
            learning_rate=_rate("learning_rate", own_only, finetune_lr,
                                "train.learning_rate * train.finetune_lr_factor"),
            augment=_prefixed(where, lambda: AugmentConfig.from_options(options, default_on=config.augment)),
            options=options,
            transfer=_prefixed(where, lambda: transfer_options(name, options)),
            parent=parent,
            **_from_config(config),
        )


# Fields every candidate takes from TrainConfig unchanged (same names in both).
_FROM_CONFIG = ("seed", "label_smoothing", "early_stopping_patience", "class_weight_threshold")


def _frozen_phase(options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A transfer candidate's ``frozen_phase`` and ``bank_views`` options, checked."""
    phase = options.get("frozen_phase", "bank")
    if phase not in FROZEN_PHASES:
        raise ConfigError(f"{where}.frozen_phase must be one of {list(FROZEN_PHASES)}, got {phase!r}")
    views = check_int_setting(f"{where}.bank_views", options.get("bank_views", DEFAULT_BANK_VIEWS), BANK_VIEWS_RANGE)
    return {"frozen_phase": phase, "bank_views": views}


def _from_config(config: TrainConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in _FROM_CONFIG}


def _pick(key: str, sources: _Sources, default: Any, default_name: str) -> tuple[Any, str]:
    """(value, name of the setting it came from): the first source that sets `key`, else the default."""
    for options, where in sources:
        if key in options:
            return options[key], f"{where}.{key}"
    return default, default_name


def _int(key: str, sources: _Sources, default: Any, default_name: str, bounds: tuple[int, int]) -> int:
    value, name = _pick(key, sources, default, default_name)
    return check_int_setting(name, value, bounds)


def _rate(key: str, sources: _Sources, default: Any, default_name: str) -> float:
    value, name = _pick(key, sources, default, default_name)
    return check_rate_setting(name, value, LEARNING_RATE_RANGE)


def _prefixed(where: str, check: Callable[[], _T]) -> _T:
    """Run `check`; a ConfigError it raises is raised again prefixed with the setting it concerns."""
    try:
        return check()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
