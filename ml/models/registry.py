"""Architecture registry: candidate names -> small entries, importable without TensorFlow.

Like timm's `_registry.py` and keras.applications: each backbone is an `ArchitectureSpec`
(keras constructor name, `preprocess_input` mode, default and minimum input size, the
fine-tuning boundary layer, ImageNet weight file name); each from-scratch CNN is a
`ScratchSpec` with default options. The DAG builds its trigger form and task mapping from
`candidate_names()`, so nothing here imports Keras at module level: `build_backbone`
imports it when called.

Candidate names: ``scratch_<variant>``, ``transfer_<architecture>``, made from a trained
transfer candidate ``finetune_<architecture>``, and ``ensemble_top<k>``: the k best trained
candidates of the run (on validation) averaged into one model (`ml.training.ensemble`).
A hyperparameter-search trial (`ml.training.search`) is named after its base candidate:
``<base>__t<NN>`` (``scratch_small__t03``), and parses as its base.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ml.errors import ConfigError, UnknownArchitectureError

if TYPE_CHECKING:
    import keras

CANDIDATE_KINDS = ("scratch", "transfer", "finetune", "ensemble")
ENSEMBLE_PREFIX = "ensemble_top"
ENSEMBLE_K_RANGE = (2, 8)  # 2 members at least to average; 8 keeps the model and its latency bounded
ENSEMBLE_WEIGHTINGS = ("uniform", "inverse_log_loss")
ENSEMBLE_OPTION_KEYS = ("weighting",)
PREPROCESS_MODES = ("tf", "torch", "caffe", "none")  # same as ml.models.layers.PREPROCESS_MODES
# ``<base>__t<NN>``: a search trial of a scratch_*/transfer_* base; two digits, so at most 99 trials.
TRIAL_SEPARATOR = "__t"
MAX_TRIALS = 99


@dataclass(frozen=True)
class ArchitectureSpec:
    """One keras.applications backbone.

    Attributes:
        name: Registry key (``mobilenet_v2``), used in candidate names.
        constructor: Attribute of ``keras.applications`` (``MobileNetV2``).
        preprocess: keras ``preprocess_input`` mode: "tf", "torch", "caffe" or "none" (the
            backbone normalises [0, 255] pixels itself, e.g. EfficientNet, MobileNetV3).
        default_size: Input size the ImageNet weights were trained at (pixels).
        min_size: Smallest input keras.applications accepts (pixels).
        finetune_boundary: Name of the first backbone layer unfrozen when fine-tuning.
        weights_file: (image_size, alpha) -> the no-top ImageNet weight file name Keras
            caches in ``$KERAS_HOME/models/``.
        alphas: Width multipliers with ImageNet weights; empty when the model has no alpha.
        default_alpha: Alpha used when a candidate sets none.
    """

    name: str
    constructor: str
    preprocess: str
    default_size: int
    min_size: int
    finetune_boundary: str
    weights_file: Callable[[int, float], str]
    alphas: tuple[float, ...] = ()
    default_alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.preprocess not in PREPROCESS_MODES:
            raise ConfigError(
                f"architecture {self.name!r}: preprocess must be one of {PREPROCESS_MODES}, "
                f"got {self.preprocess!r}"
            )
        if self.min_size > self.default_size:
            raise ConfigError(
                f"architecture {self.name!r}: min_size {self.min_size} > default_size {self.default_size}"
            )

    @property
    def has_alpha(self) -> bool:
        return bool(self.alphas)

    def resolve_alpha(self, alpha: float | None) -> float | None:
        """The alpha to build with (None for models without one); rejects alpha where unsupported."""
        if not self.has_alpha:
            if alpha is not None:
                raise ConfigError(f"architecture {self.name!r} has no 'alpha' option, got alpha={alpha}")
            return None
        value = self.default_alpha if alpha is None else float(alpha)
        if not 0 < value <= 2:
            raise ConfigError(f"architecture {self.name!r}: alpha must be in (0, 2], got {value}")
        return value

    def check_size(self, image_size: int) -> None:
        """Raise ConfigError when `image_size` is below what the backbone accepts."""
        if image_size < self.min_size:
            raise ConfigError(
                f"architecture {self.name!r} needs image_size >= {self.min_size} pixels, got {image_size}"
            )

    def weights_file_name(self, image_size: int, alpha: float | None = None) -> str:
        """The ImageNet (no-top) weight file Keras downloads for this build."""
        resolved = self.resolve_alpha(alpha)
        if resolved is not None and resolved not in self.alphas:
            raise ConfigError(
                f"architecture {self.name!r} has ImageNet weights only for alpha in "
                f"{list(self.alphas)}, got {resolved}"
            )
        return self.weights_file(image_size, resolved if resolved is not None else 1.0)

    def build_backbone(
        self, image_size: int, *, alpha: float | None = None, weights: str | None = None
    ) -> keras.Model:
        """Build the headless backbone for RGB inputs of image_size x image_size.

        Args:
            image_size: Input height and width in pixels (>= min_size).
            alpha: Width multiplier for MobileNets; None for the default.
            weights: None (random init), "imagenet", or a weights file path Keras loads.
        """
        import keras

        self.check_size(image_size)
        kwargs: dict[str, Any] = {
            "include_top": False,
            "weights": weights,
            "input_shape": (image_size, image_size, 3),
        }
        resolved = self.resolve_alpha(alpha)
        if resolved is not None:
            kwargs["alpha"] = resolved
        return getattr(keras.applications, self.constructor)(**kwargs)


@dataclass(frozen=True)
class ScratchSpec:
    """One from-scratch CNN variant: default options for `ml.models.scratch.build_scratch`.

    Options: ``depth`` (conv blocks), ``width`` (filters of the first block, doubled per
    block), ``residual`` (residual blocks instead of plain conv stacks), ``dropout`` (per
    block), ``head_dropout``, ``l2`` (kernel regulariser).
    """

    name: str
    description: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def resolve_options(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults merged with `overrides`; unknown keys raise ConfigError naming the allowed ones."""
        merged = dict(self.options)
        for key, value in (overrides or {}).items():
            if key not in merged and key not in TRAINING_OPTION_KEYS:
                raise ConfigError(
                    f"unknown option {key!r} for scratch_{self.name}; allowed: "
                    f"{sorted(set(merged) | set(TRAINING_OPTION_KEYS))}"
                )
            merged[key] = value
        return merged


# Options any candidate accepts (applied by training, not the model builder).
TRAINING_OPTION_KEYS = ("augment", "augmentation", "batch_size", "epochs", "learning_rate", "image_size")
TRANSFER_OPTION_KEYS = ("alpha", "dropout", "head_units")
# How a transfer candidate's frozen phase trains with augmentation on (ml.training.bank).
FROZEN_PHASE_OPTION_KEYS = ("frozen_phase", "bank_views")

_ARCHITECTURES: dict[str, ArchitectureSpec] = {}
_SCRATCH: dict[str, ScratchSpec] = {}

# What a hyperparameter search (`ml.training.search`) may vary besides a base's model options:
# training settings any base reads. ``epochs`` is the search's own (the rung schedule).
SEARCH_TRAINING_KEYS = ("learning_rate", "batch_size", "image_size")


def register_architecture(spec: ArchitectureSpec) -> ArchitectureSpec:
    """Add a backbone to the registry; a duplicate name raises ConfigError."""
    if spec.name in _ARCHITECTURES:
        raise ConfigError(f"architecture {spec.name!r} is already registered")
    _ARCHITECTURES[spec.name] = spec
    return spec


def register_scratch(spec: ScratchSpec) -> ScratchSpec:
    """Add a from-scratch variant to the registry; a duplicate name raises ConfigError."""
    if spec.name in _SCRATCH:
        raise ConfigError(f"scratch variant {spec.name!r} is already registered")
    _SCRATCH[spec.name] = spec
    return spec


def _mobilenet_file(size: int, alpha: float) -> str:
    # keras loads the 224 weights for sizes it has no file for (mobilenet.py).
    rows = size if size in (128, 160, 192, 224) else 224
    text = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}[alpha]
    return f"mobilenet_{text}_{rows}_tf_no_top.h5"


def _mobilenet_v2_file(size: int, alpha: float) -> str:
    rows = size if size in (96, 128, 160, 192, 224) else 224
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"


def _fixed(file_name: str) -> Callable[[int, float], str]:
    return lambda size, alpha: file_name


for _spec in (
    ArchitectureSpec(
        "mobilenet", "MobileNet", "tf", 224, 32, "conv_dw_12", _mobilenet_file, alphas=(0.25, 0.5, 0.75, 1.0)
    ),
    ArchitectureSpec(
        "mobilenet_v2",
        "MobileNetV2",
        "tf",
        224,
        32,
        "block_16_expand",
        _mobilenet_v2_file,
        alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
    ),
    ArchitectureSpec(
        "mobilenet_v3_small",
        "MobileNetV3Small",
        "none",
        224,
        32,
        "expanded_conv_10_expand",
        lambda size, alpha: f"weights_mobilenet_v3_small_224_{alpha}_float_no_top_v2.h5",
        alphas=(0.75, 1.0),
    ),
    ArchitectureSpec(
        "mobilenet_v3_large",
        "MobileNetV3Large",
        "none",
        224,
        32,
        "expanded_conv_14_expand",
        lambda size, alpha: f"weights_mobilenet_v3_large_224_{alpha}_float_no_top_v2.h5",
        alphas=(0.75, 1.0),
    ),
    ArchitectureSpec(
        "efficientnet_b0",
        "EfficientNetB0",
        "none",
        224,
        32,
        "block7a_expand_conv",
        _fixed("efficientnetb0_notop.h5"),
    ),
    ArchitectureSpec(
        "efficientnet_v2_b0",
        "EfficientNetV2B0",
        "none",
        224,
        32,
        "block6h_expand_conv",
        _fixed("efficientnetv2-b0_notop.h5"),
    ),
    ArchitectureSpec(
        "resnet50_v2",
        "ResNet50V2",
        "tf",
        224,
        32,
        "conv5_block3_preact_bn",
        _fixed("resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    ),
    # InceptionV3: unfreezing from mixed9 trains the last inception block (mixed10's branches).
    ArchitectureSpec(
        "inception_v3",
        "InceptionV3",
        "tf",
        299,
        75,
        "mixed9",
        _fixed("inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    ),
    ArchitectureSpec(
        "xception",
        "Xception",
        "tf",
        299,
        71,
        "block14_sepconv1",
        _fixed("xception_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    ),
    ArchitectureSpec(
        "densenet121",
        "DenseNet121",
        "torch",
        224,
        32,
        "conv5_block13_0_bn",
        _fixed("densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    ),
    ArchitectureSpec(
        "vgg16",
        "VGG16",
        "caffe",
        224,
        32,
        "block5_conv1",
        _fixed("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    ),
):
    register_architecture(_spec)

for _scratch in (
    ScratchSpec(
        "tiny",
        "2 small conv blocks: fast smoke-test baseline",
        {"depth": 2, "width": 8, "residual": False, "dropout": 0.1, "head_dropout": 0.2, "l2": 1e-4},
    ),
    ScratchSpec(
        "small",
        "4 conv blocks (conv-BN-ReLU x2, maxpool, dropout), L2, global average pool",
        # width 16 (16-32-64-128 filters, ~0.3 M params): the same accuracy as 32 on the sample
        # data (0.52 vs 0.50 val, 5 classes x 80 at 64 px) in half the time on 2 CPU cores.
        {"depth": 4, "width": 16, "residual": False, "dropout": 0.2, "head_dropout": 0.4, "l2": 1e-4},
    ),
    ScratchSpec(
        "residual",
        "4 residual blocks (ResNet-style shortcuts) with BN, L2, global average pool",
        {"depth": 4, "width": 32, "residual": True, "dropout": 0.1, "head_dropout": 0.4, "l2": 1e-4},
    ),
):
    register_scratch(_scratch)


def architecture_names() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_ARCHITECTURES)


# Input sizes Keras publishes ImageNet files for (MobileNet v1 / v2); other builds have one file.
_IMAGENET_FILE_SIZES = (96, 128, 160, 192, 224)


def imagenet_builds_for_file(file_name: str) -> list[tuple[str, float | None, int]]:
    """The builds (architecture, alpha, image size) whose Keras ImageNet file is named `file_name`.

    Empty for a file of any other name (a fine-tuned export, a renamed copy). Lets an error about a
    weights file that does not fit say which candidate settings it was made for.
    """
    builds = []
    for name in architecture_names():
        spec = _ARCHITECTURES[name]
        for alpha in spec.alphas or (None,):
            for size in (spec.default_size, *_IMAGENET_FILE_SIZES):
                if size >= spec.min_size and spec.weights_file_name(size, alpha) == file_name:
                    builds.append((name, alpha, size))
                    break
    return builds


def scratch_variant_names() -> list[str]:
    """Registered from-scratch variants, sorted."""
    return sorted(_SCRATCH)


def ensemble_names() -> list[str]:
    """``ensemble_top<k>`` for every allowed k."""
    return [f"{ENSEMBLE_PREFIX}{k}" for k in range(ENSEMBLE_K_RANGE[0], ENSEMBLE_K_RANGE[1] + 1)]


def candidate_names(*, include_finetune: bool = False, include_ensembles: bool = False) -> list[str]:
    """Every trainable candidate name: ``scratch_<variant>`` then ``transfer_<arch>``.

    Args:
        include_finetune: Also list ``finetune_<arch>`` (made from transfer candidates).
        include_ensembles: Also list ``ensemble_top<k>`` (built from the run's trained candidates).
    """
    names = [f"scratch_{v}" for v in scratch_variant_names()]
    names += [f"transfer_{a}" for a in architecture_names()]
    if include_finetune:
        names += [f"finetune_{a}" for a in architecture_names()]
    if include_ensembles:
        names += ensemble_names()
    return names


def candidate_choices() -> list[str]:
    """What train.candidates (and the trigger form) may list: trainable candidates and ensembles."""
    return candidate_names(include_ensembles=True)


def is_ensemble(name: object) -> bool:
    """Whether a candidate name is an ``ensemble_top<k>`` (valid k or not)."""
    return str(name).startswith(ENSEMBLE_PREFIX)


def ensemble_size(name: str) -> int:
    """k of ``ensemble_top<k>``.

    Raises:
        UnknownArchitectureError: not ``ensemble_top`` followed by a plain number.
        ConfigError: k outside ENSEMBLE_K_RANGE.
    """
    digits = str(name).removeprefix(ENSEMBLE_PREFIX)
    if not is_ensemble(name) or not digits.isascii() or not digits.isdigit() or digits != str(int(digits)):
        raise _unknown("candidate", name, [*candidate_names(include_finetune=True), f"{ENSEMBLE_PREFIX}<k>"])
    low, high = ENSEMBLE_K_RANGE
    if not low <= int(digits) <= high:
        raise ConfigError(f"candidate {name!r}: an ensemble averages k in [{low}, {high}] members, got k={digits}")
    return int(digits)


def ensemble_weighting(name: str, options: Mapping[str, Any] | None) -> str:
    """The validated ``weighting`` option of an ensemble candidate (default "uniform")."""
    unknown = sorted(set(options or {}) - set(ENSEMBLE_OPTION_KEYS))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {name}; allowed: {list(ENSEMBLE_OPTION_KEYS)}")
    weighting = (options or {}).get("weighting", "uniform")
    if weighting not in ENSEMBLE_WEIGHTINGS:
        raise ConfigError(f"{name}.weighting must be one of {list(ENSEMBLE_WEIGHTINGS)}, got {weighting!r}")
    return str(weighting)


def _unknown(what: str, name: str, known: list[str]) -> UnknownArchitectureError:
    return UnknownArchitectureError(f"unknown {what} {name!r}; known: {', '.join(known)}")


def trial_name(base: str, number: int) -> str:
    """The name of search trial `number` (1-based) of `base`: ``scratch_small__t03``."""
    if not 1 <= number <= MAX_TRIALS:
        raise ConfigError(f"trial number must be in [1, {MAX_TRIALS}], got {number}")
    return f"{base}{TRIAL_SEPARATOR}{number:02d}"


def trial_base(name: object) -> str | None:
    """The base candidate of a trial name (``scratch_small__t03`` -> ``scratch_small``); None otherwise."""
    base, sep, digits = str(name).rpartition(TRIAL_SEPARATOR)
    if not sep or len(digits) != 2 or not digits.isascii() or not digits.isdigit() or digits == "00":
        return None
    return base


def parse_candidate(name: str) -> tuple[str, str]:
    """Split a candidate name into (kind, variant-or-architecture).

    ``"transfer_mobilenet_v2"`` -> ``("transfer", "mobilenet_v2")``; ``"scratch_small"`` ->
    ``("scratch", "small")``, ``"ensemble_top3"`` -> ``("ensemble", "top3")``; a search trial
    ``"scratch_small__t03"`` -> ``("scratch", "small")``. Raises UnknownArchitectureError listing
    the known candidates (ConfigError for an ensemble's k out of range).
    """
    base = trial_base(name)
    if base is not None and base.startswith(("scratch_", "transfer_")) and trial_base(base) is None:
        return parse_candidate(base)
    if is_ensemble(name):
        ensemble_size(name)
        return "ensemble", str(name).removeprefix("ensemble_")
    kind, sep, rest = str(name).partition("_")
    if sep and kind == "scratch" and rest in _SCRATCH:
        return kind, rest
    if sep and kind in ("transfer", "finetune") and rest in _ARCHITECTURES:
        return kind, rest
    raise _unknown("candidate", name, candidate_names(include_finetune=True))


def searchable_keys(candidate: str) -> tuple[str, ...]:
    """The settings a search may vary for the base `candidate` (a ``scratch_*``/``transfer_*`` name), sorted.

    Scratch CNNs: their variant's model options (depth, width, dropout, ...) and the training keys;
    transfer candidates: ``dropout``, ``head_units``, ``alpha`` (MobileNets only) and the training keys.

    Raises:
        UnknownArchitectureError: not a known candidate.
        ConfigError: a kind that cannot be searched (fine-tuned, ensemble).
    """
    kind, name = parse_candidate(candidate)
    if kind == "scratch":
        return tuple(sorted({*_SCRATCH[name].options, *SEARCH_TRAINING_KEYS}))
    if kind == "transfer":
        model_keys = [k for k in TRANSFER_OPTION_KEYS if k != "alpha" or _ARCHITECTURES[name].has_alpha]
        return tuple(sorted({*model_keys, *SEARCH_TRAINING_KEYS}))
    raise ConfigError(f"{candidate} cannot be a search base: only scratch_* and transfer_* candidates can")


def get_architecture(name: str) -> ArchitectureSpec:
    """The backbone entry for an architecture name (``mobilenet_v2``).

    A transfer/finetune candidate name (``transfer_mobilenet_v2``) is accepted too. Raises
    UnknownArchitectureError listing the known architectures.
    """
    if name in _ARCHITECTURES:
        return _ARCHITECTURES[name]
    kind, sep, rest = str(name).partition("_")
    if sep and kind in ("transfer", "finetune") and rest in _ARCHITECTURES:
        return _ARCHITECTURES[rest]
    raise _unknown("architecture", name, architecture_names())


def get_scratch_variant(name: str) -> ScratchSpec:
    """The scratch entry for ``small`` or ``scratch_small``; unknown names raise with the known ones."""
    variant = name.removeprefix("scratch_")
    if variant in _SCRATCH:
        return _SCRATCH[variant]
    raise _unknown("scratch variant", name, scratch_variant_names())
