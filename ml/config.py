"""Typed pipeline configuration: defaults in code, overrides from YAML, per-run knobs as a dict.

One frozen dataclass per concern, validated on construction. `PipelineConfig.load()` merges
`config/pipeline.yaml` (or the file named by `ML_CONFIG`) with per-run overrides such as DAG
params, so the CLI, the DAG and the tests all build the same object the same way.

Secrets never live here: object-store and Kaggle credentials come from the environment or
from Airflow connections and are passed to the clients directly.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = REPO_ROOT / "config" / "pipeline.yaml"

PRIMARY_METRICS = ("accuracy", "log_loss")
LAYOUTS = ("auto", "kaggle", "folders")
WEIGHT_CHOICES_HELP = "'imagenet', 'none', a local .h5/.keras path, or an s3:// URI"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_registry_name(name: object, setting: str) -> None:
    """A candidate name must be one the registry knows *before* anything is named after it
    (a folder, a store prefix): ``scratch_a/../../victim`` is refused here, not after a delete."""
    from ml.errors import UnknownArchitectureError, UnsafeNameError
    from ml.registry.layout import check_candidate

    try:
        check_candidate(name)
    except (UnknownArchitectureError, UnsafeNameError, ConfigError) as exc:
        raise ConfigError(f"{setting}: {exc}") from None


def _require_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """`value` must be an int (not a bool) in [low, high]; the message says what is allowed."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    _require(isinstance(value, int) and not isinstance(value, bool)
             and low <= value and (high is None or value <= high),
             f"{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class StorageConfig:
    """Where models and run artifacts are published (any S3-compatible store)."""

    bucket: str = "ml-models"
    model_name: str = "image-classifier"
    endpoint_url: str | None = None  # None means AWS S3 itself
    region: str = "us-east-1"

    def __post_init__(self) -> None:
        _require(bool(self.bucket) and self.bucket == self.bucket.lower(),
                 f"storage.bucket must be a lower-case S3 bucket name, got {self.bucket!r}")
        _require(bool(self.model_name) and "/" not in self.model_name,
                 f"storage.model_name must be a non-empty name without '/', got {self.model_name!r}")


@dataclass(frozen=True)
class DataConfig:
    """How a dataset is found, read, checked and split."""

    source: str = ""
    layout: str = "auto"
    labels_file: str = "labels.csv"
    id_column: str = "id"
    label_column: str = "breed"
    image_dir: str = "train"
    # Splits are assigned from a hash of each image's bytes, so an image keeps its split
    # when new data arrives (retrain.py's rule), then topped up so every class is in each.
    val_percent: float = 15.0
    test_percent: float = 15.0
    seed: int = 1337
    # Quality gate: failing expectations stop the run before training.
    min_classes: int = 2
    min_images_per_class: int = 5
    max_quarantined_fraction: float = 0.05
    # Identical bytes under two labels: every copy is quarantined and warned about; the run stops
    # only above this share of all images (public datasets carry a few: 0.2% of one 4,000-photo set).
    max_label_conflict_fraction: float = 0.01
    min_width: int = 32
    min_height: int = 32
    allowed_labels: tuple[str, ...] | None = None
    # Warnings: reported, the run goes on.
    warn_images_per_class: int = 100  # the seeds' rule of thumb
    warn_imbalance_ratio: float = 3.0
    # Safety limits for data from the internet. Archives and s3:// prefixes share the first two:
    # bytes (uncompressed) and entries/objects of one source, nested archives included.
    max_archive_bytes: int = 20 * 1024**3  # 20 GiB in all
    max_archive_entries: int = 500_000  # ~50x the 10,222 photos of dog-breed-identification
    max_compression_ratio: float = 200.0
    max_image_pixels: int = 80_000_000  # ~ 9000 x 9000
    # Bytes read per image; bigger files are quarantined unread. A 100 Mpx camera JPEG is ~40 MB.
    max_image_bytes: int = 50 * 1024**2
    # Names of archive entries, s3:// object keys and files of folder sources, in UTF-8 bytes:
    # 255 is the filesystems' NAME_MAX; 1,024 leaves room for the work folder within Linux's
    # 4,096-byte PATH_MAX (real datasets: ~50-byte names, 2-4 levels deep).
    max_name_bytes: int = 1024
    max_name_depth: int = 32
    max_name_part_bytes: int = 255
    # The model head, the K x K confusion matrix and per-class reports grow with the number of
    # classes K; ImageNet has 1,000 (a 1,000 x 1,000 int64 matrix is 8 MB).
    max_classes: int = 1000
    # Labels are shown in pages and used as JSON keys; dog breeds are under 40 characters.
    max_label_chars: int = 200
    # labels.csv is read into memory (~300 bytes per row): 1 M rows ~ 300 MB; dog-breed's is 482 KB.
    max_label_rows: int = 1_000_000
    max_labels_file_bytes: int = 256 * 1024**2

    def __post_init__(self) -> None:
        _require(self.layout in LAYOUTS, f"data.layout must be one of {LAYOUTS}, got {self.layout!r}")
        _require(0 <= self.val_percent < 100 and 0 < self.test_percent < 100
                 and self.val_percent + self.test_percent < 100,
                 "data.val_percent and data.test_percent must be in [0, 100) and sum below 100, "
                 f"got {self.val_percent} and {self.test_percent}")
        _require(self.min_classes >= 2, f"data.min_classes must be >= 2, got {self.min_classes}")
        _require(self.min_images_per_class >= 1,
                 f"data.min_images_per_class must be >= 1, got {self.min_images_per_class}")
        _require(0 <= self.max_quarantined_fraction <= 1,
                 f"data.max_quarantined_fraction must be in [0, 1], got {self.max_quarantined_fraction}")
        _require(isinstance(self.max_label_conflict_fraction, (int, float))
                 and not isinstance(self.max_label_conflict_fraction, bool)
                 and 0 <= self.max_label_conflict_fraction <= 1,
                 f"data.max_label_conflict_fraction must be a number in [0, 1], got "
                 f"{self.max_label_conflict_fraction!r}")
        _require(self.max_compression_ratio > 1,
                 f"data.max_compression_ratio must be > 1, got {self.max_compression_ratio}")
        for name in ("max_archive_bytes", "max_archive_entries", "max_image_pixels", "max_image_bytes",
                     "max_label_rows", "max_labels_file_bytes"):
            _require_int(f"data.{name}", getattr(self, name), 1)
        # 4,095: PATH_MAX minus the terminating NUL; 255: NAME_MAX, no filesystem takes longer.
        _require_int("data.max_name_bytes", self.max_name_bytes, 1, 4095)
        _require_int("data.max_name_depth", self.max_name_depth, 1, 2048)
        _require_int("data.max_name_part_bytes", self.max_name_part_bytes, 1, 255)
        _require(isinstance(self.max_classes, int) and not isinstance(self.max_classes, bool)
                 and self.max_classes >= self.min_classes,
                 f"data.max_classes must be an integer >= data.min_classes ({self.min_classes}), "
                 f"got {self.max_classes!r}")
        _require_int("data.max_label_chars", self.max_label_chars, 1, 100_000)
        if self.allowed_labels is not None:
            object.__setattr__(self, "allowed_labels", tuple(self.allowed_labels))


# The one valid range of each training setting a candidate may override. TrainConfig checks its
# values and ml.training.settings.CandidateSettings each candidate's overrides with the functions
# below, so a value the config file accepts is one a candidate option accepts, and the reverse.
IMAGE_SIZE_RANGE = (32, 600)  # pixels: keras.applications' smallest input up to EfficientNetB7's 600
EPOCHS_RANGE = (1, 1000)
BATCH_SIZE_RANGE = (1, 4096)  # images per step
LEARNING_RATE_RANGE = (0.0, 1.0)  # Adam's initial rate; both ends excluded


def check_int_setting(name: str, value: Any, bounds: tuple[int, int]) -> int:
    """`value` as an int in [low, high]: integral floats (YAML ``96.0``) pass, bools and strings do not.

    Raises:
        ConfigError: naming `name`, what is allowed and what was given.
    """
    low, high = bounds
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (number and value == int(value)):
        raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in [{low}, {high}], got {value!r}")
    return int(value)


# The retraining DAG's maximum run time (a DeadlineAlert from the run's logical date). Read from the
# environment at parse time, like ML_RETRAIN_SCHEDULE: the DAG file may not read the YAML file.
MAX_RUN_MINUTES_ENV = "ML_MAX_RUN_MINUTES"
# 8 h: one training task may use its whole 6 h execution_timeout, the other stages take < 1 h.
# The alert counts from the logical date, not DAGRUN_QUEUED_AT: in Airflow 3.3.x clearing a task of a
# run with a queued-at deadline fails (apache/airflow#70368: "TypeError: unsupported type for timedelta
# seconds component: dict", REST 500), which would break "Clear", the recovery path docs/faults.md uses.
DEFAULT_MAX_RUN_MINUTES = 480
MAX_RUN_MINUTES_RANGE = (1, 7 * 24 * 60)  # up to a week: the longest schedule gap that makes sense


def max_run_minutes(text: str | None) -> int | None:
    """The maximum run time in minutes from the `ML_MAX_RUN_MINUTES` text; None when it is "none" (no alert).

    Unset or empty gives `DEFAULT_MAX_RUN_MINUTES`.

    Raises:
        ConfigError: naming the variable, what is allowed and what was given.
    """
    value = (text or "").strip()
    if not value:
        return DEFAULT_MAX_RUN_MINUTES
    if value.lower() == "none":
        return None
    low, high = MAX_RUN_MINUTES_RANGE
    if not value.isdigit() or not low <= int(value) <= high:
        raise ConfigError(f"{MAX_RUN_MINUTES_ENV} must be a whole number of minutes in [{low}, {high}] or "
                          f"'none' (no deadline alert), got {text!r}")
    return int(value)


def check_rate_setting(name: str, value: Any, bounds: tuple[float, float]) -> float:
    """`value` as a float strictly between the two bounds.

    Raises:
        ConfigError: naming `name`, what is allowed and what was given.
    """
    low, high = bounds
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and low < value < high):
        raise ConfigError(f"{name} must be a number in ({low:g}, {high:g}), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TrainConfig:
    """Which candidates to train and how."""

    candidates: tuple[str, ...] = ("scratch_small", "transfer_mobilenet_v2")
    epochs: int = 8
    # Epoch budget of a transfer head trained on cached features (bottlenecks or the bank): an
    # epoch costs milliseconds there, so it trains until early stopping ends it, not for `epochs`.
    head_epochs: int = 200
    image_size: int = 96
    batch_size: int = 32
    learning_rate: float = 1e-3
    # Adam's LR of a transfer head on cached features, and the early-stopping patience it gets (its
    # epochs cost milliseconds, and on ~80 val images the val loss is noisy: patience 6 stopped heads
    # at epoch 2-4). Measured on animals3 (benchmarks/README.md, head_vs_logreg: 8 re-splits, test
    # accuracy head / LogisticRegression min, median): 3e-3 / 6: 0.954, 0.986; 1e-2 / 6: 0.952,
    # 0.981; 1e-2 / 10: 0.953, 1.000; 1e-2 / 20: 0.972, 1.000; 1e-2 / 30: 0.981, 1.000 (at most
    # 63 epochs run: the 200-epoch cap does not bind); 3e-3 / 20: 0.954, 0.991.
    head_learning_rate: float = 1e-2
    head_early_stopping_patience: int = 30
    weights: str = "none"  # WEIGHT_CHOICES_HELP; 'none' is the offline default
    seed: int = 1337
    early_stopping_patience: int = 6
    label_smoothing: float = 0.0
    augment: bool = True
    class_weight_threshold: float = 1.5  # imbalance ratio above which classes are re-weighted
    finetune_top_k: int = 1
    finetune_epochs: int = 3
    finetune_lr_factor: float = 0.1  # fine-tuning LR = learning_rate * factor
    # Save the resumable training state to the store after every N completed epochs
    # (ml.training.checkpoints); a killed task's retry redoes at most N - 1 epochs.
    checkpoint_every_epochs: int = 1
    candidate_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cands = tuple(self.candidates)
        object.__setattr__(self, "candidates", cands)
        _require(len(cands) > 0, "train.candidates must name at least one candidate")
        _require(len(set(cands)) == len(cands), f"train.candidates has duplicates: {list(cands)}")
        for name in cands:
            _require(isinstance(name, str) and name.startswith(("scratch_", "transfer_", "ensemble_top")),
                     f"candidate {name!r} must start with 'scratch_', 'transfer_' or 'ensemble_top'")
            _check_registry_name(name, "train.candidates")
            _require(_trial_base(name) is None, f"train.candidates: {name!r} is a search trial's name; trials are "
                                                "made by the search block (search.bases), not listed")
        for name in self.candidate_options:
            _check_registry_name(name, "train.candidate_options")
        _check_ensembles(self)
        for name, bounds in (("epochs", EPOCHS_RANGE), ("image_size", IMAGE_SIZE_RANGE),
                             ("batch_size", BATCH_SIZE_RANGE), ("finetune_epochs", EPOCHS_RANGE),
                             ("checkpoint_every_epochs", EPOCHS_RANGE), ("head_epochs", EPOCHS_RANGE),
                             ("head_early_stopping_patience", EPOCHS_RANGE)):
            object.__setattr__(self, name, check_int_setting(f"train.{name}", getattr(self, name), bounds))
        object.__setattr__(self, "learning_rate",
                           check_rate_setting("train.learning_rate", self.learning_rate, LEARNING_RATE_RANGE))
        object.__setattr__(self, "head_learning_rate", check_rate_setting(
            "train.head_learning_rate", self.head_learning_rate, LEARNING_RATE_RANGE))
        _require(bool(self.weights), f"train.weights must be {WEIGHT_CHOICES_HELP}")
        _require(0 <= self.label_smoothing < 1,
                 f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _require(self.finetune_top_k >= 0, f"train.finetune_top_k must be >= 0, got {self.finetune_top_k}")
        _require(0 < self.finetune_lr_factor <= 1,
                 f"train.finetune_lr_factor must be in (0, 1], got {self.finetune_lr_factor}")

    def options_for(self, candidate: str) -> dict[str, Any]:
        """Per-candidate settings (e.g. MobileNet's alpha) from `candidate_options`."""
        return dict(self.candidate_options.get(candidate, {}))

    @property
    def trained_candidates(self) -> tuple[str, ...]:
        """The candidates a training task trains (every one but the ensembles)."""
        from ml.models.registry import is_ensemble

        return tuple(name for name in self.candidates if not is_ensemble(name))

    @property
    def ensembles(self) -> tuple[str, ...]:
        """The ``ensemble_top<k>`` candidates, built once training and fine-tuning are done."""
        from ml.models.registry import is_ensemble

        return tuple(name for name in self.candidates if is_ensemble(name))


def _check_ensembles(train: TrainConfig) -> None:
    """Each ensemble's k fits the members this config can train, and its options are known ones."""
    from ml.models.registry import ensemble_size, ensemble_weighting, is_ensemble

    transfer = sum(name.startswith("transfer_") for name in train.trained_candidates)
    members = len(train.trained_candidates) + min(train.finetune_top_k, transfer)
    for name in train.ensembles:
        k = ensemble_size(name)
        _require(k <= members, f"train.candidates: {name} averages {k} members but this config trains only "
                               f"{members} ({len(train.trained_candidates)} candidates + "
                               f"{min(train.finetune_top_k, transfer)} fine-tuned); lower k or add candidates")
    for name, options in train.candidate_options.items():
        if is_ensemble(name):
            try:
                ensemble_weighting(name, options)
            except ConfigError as exc:
                raise ConfigError(f"train.candidate_options.{name}: {exc}") from None


def _trial_base(name: str) -> str | None:
    from ml.models.registry import trial_base

    return trial_base(name)


SEARCH_METRICS = ("val_accuracy", "val_loss")
SEARCH_RUNGS_RANGE = (1, 3)  # the DAG has three rung groups; unused ones map over zero trials
SEARCH_ETA_RANGE = (2, 10)  # keep the top 1/eta of each rung
LOG_UNIFORM = "log_uniform"
# Space keys that take real values (a log-uniform range is allowed); the others take choices only.
SEARCH_FLOAT_KEYS = ("learning_rate", "dropout", "head_dropout", "l2", "alpha")


@dataclass(frozen=True)
class SearchConfig:
    """Hyperparameter search as candidates: successive halving over trials of a few base candidates.

    Trial i (1-based) is ``<base>__t<NN>`` of ``bases[(i - 1) % len(bases)]`` with settings drawn from
    `space` by `seed` (`ml.training.search.sample_trials`). Rung r trains every trial still in to
    ``min_epochs * eta**(r - 1)`` epochs, resuming from its rung r - 1 checkpoint; after each rung but
    the last, the top 1/eta by `metric` (at least one) go on. Off by default.

    Attributes:
        enabled: Run the search (its trials join the run's candidates).
        bases: Candidates the trials vary (``scratch_*``, ``transfer_*``).
        space: Setting -> a list of choices, or ``{log_uniform: [low, high]}`` for real-valued
            settings (`SEARCH_FLOAT_KEYS`); only keys every base understands
            (`ml.models.registry.searchable_keys`).
        max_trials: Trials of rung 1 (at most 99), fewer when `max_total_epochs` says so.
        eta: Keep the top 1/eta after each rung; epochs grow by eta per rung.
        rungs: 1 to 3.
        min_epochs: Epochs of rung 1.
        max_total_epochs: Budget over every trial and rung (survivors resume, so a rung costs only
            its extra epochs); over it, `max_trials` shrinks to fit (logged), and a budget below one
            trial's full schedule is refused. None: no budget.
        metric: Survivors are chosen by ``val_accuracy`` (higher) or ``val_loss`` (lower).
        seed: Trials are drawn from this seed: the same config gives the same trials.
    """

    enabled: bool = False
    bases: tuple[str, ...] = ()
    space: Mapping[str, Any] = field(default_factory=dict)
    max_trials: int = 8
    eta: int = 2
    rungs: int = 2
    min_epochs: int = 2
    max_total_epochs: int | None = None
    metric: str = "val_accuracy"
    seed: int = 1337

    def __post_init__(self) -> None:
        _require(isinstance(self.enabled, bool), f"search.enabled must be true or false, got {self.enabled!r}")
        _require(not isinstance(self.bases, (str, bytes)) and isinstance(self.bases, (list, tuple)),
                 f"search.bases must be a list of candidate names, got {self.bases!r}")
        bases = tuple(self.bases)
        object.__setattr__(self, "bases", bases)
        _require(len(set(bases)) == len(bases), f"search.bases has duplicates: {list(bases)}")
        _require(bool(bases) or not self.enabled, "search.bases must name at least one candidate when "
                                                  "search.enabled is true (e.g. [scratch_small])")
        for name, bounds in (("max_trials", (1, 99)), ("eta", SEARCH_ETA_RANGE), ("rungs", SEARCH_RUNGS_RANGE),
                             ("min_epochs", EPOCHS_RANGE)):
            object.__setattr__(self, name, check_int_setting(f"search.{name}", getattr(self, name), bounds))
        if self.max_total_epochs is not None:
            object.__setattr__(self, "max_total_epochs", check_int_setting(
                "search.max_total_epochs", self.max_total_epochs, (1, 1_000_000)))
        _require(isinstance(self.seed, int) and not isinstance(self.seed, bool),
                 f"search.seed must be an integer, got {self.seed!r}")
        _require(self.metric in SEARCH_METRICS, f"search.metric must be one of {list(SEARCH_METRICS)}, "
                                                f"got {self.metric!r}")
        last = self.min_epochs * self.eta ** (self.rungs - 1)
        _require(last <= EPOCHS_RANGE[1], f"search: the last rung would train {last} epochs (min_epochs "
                                          f"{self.min_epochs} x eta {self.eta}^{self.rungs - 1}); at most "
                                          f"{EPOCHS_RANGE[1]} allowed: lower min_epochs, eta or rungs")
        for base in bases:
            _check_registry_name(base, "search.bases")
            _require(base.startswith(("scratch_", "transfer_")) and _trial_base(base) is None,
                     f"search.bases: {base!r} cannot be searched; allowed: scratch_* and transfer_* candidates")
        _require(isinstance(self.space, Mapping), f"search.space must be a mapping of setting -> choices, "
                                                  f"got {self.space!r}")
        object.__setattr__(self, "space", {str(k): _check_space_entry(str(k), v, bases)
                                           for k, v in self.space.items()})
        if self.max_total_epochs is not None and self.max_total_epochs < last:
            raise ConfigError(f"search.max_total_epochs {self.max_total_epochs} is below one trial's schedule "
                              f"through all {self.rungs} rungs ({last} epochs); raise it or lower "
                              "min_epochs, eta or rungs")

    @property
    def rung_epochs(self) -> tuple[int, ...]:
        """Epochs each rung trains to: ``min_epochs * eta**(r - 1)`` for r = 1..rungs."""
        return tuple(self.min_epochs * self.eta ** r for r in range(self.rungs))


def _check_space_entry(key: str, value: Any, bases: tuple[str, ...]) -> Any:
    """One search.space entry, checked for shape and for every base understanding `key`."""
    from ml.models.registry import searchable_keys

    where = f"search.space.{key}"
    for base in bases:
        allowed = searchable_keys(base)
        _require(key in allowed, f"{where}: {base} has no setting {key!r}; allowed: {list(allowed)}")
    _require(key != "epochs", f"{where}: epochs are set by the rung schedule (search.min_epochs, eta, rungs)")
    if isinstance(value, Mapping):
        _require(set(value) == {LOG_UNIFORM}, f"{where} must be a list of choices or {{{LOG_UNIFORM}: "
                                              f"[low, high]}}, got {dict(value)!r}")
        _require(key in SEARCH_FLOAT_KEYS, f"{where}: a {LOG_UNIFORM} range needs a real-valued setting "
                                           f"({list(SEARCH_FLOAT_KEYS)}); give {key} a list of choices")
        bounds = value[LOG_UNIFORM]
        ok = (isinstance(bounds, (list, tuple)) and len(bounds) == 2
              and all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bounds)
              and 0 < bounds[0] < bounds[1])
        _require(ok, f"{where}.{LOG_UNIFORM} must be [low, high] with 0 < low < high, got {bounds!r}")
        return {LOG_UNIFORM: (float(bounds[0]), float(bounds[1]))}
    _require(isinstance(value, (list, tuple)) and len(value) > 0,
             f"{where} must be a non-empty list of choices or {{{LOG_UNIFORM}: [low, high]}}, got {value!r}")
    _require(all(isinstance(v, (int, float, bool, str)) for v in value),
             f"{where}: choices must be numbers, booleans or strings, got {list(value)!r}")
    _require(len(set(map(repr, value))) == len(value), f"{where} has duplicate choices: {list(value)}")
    return tuple(value)


@dataclass(frozen=True)
class GateConfig:
    """When a challenger may replace the production model."""

    metric: str = "accuracy"
    min_delta: float = 0.01
    # The very first model has no champion: it must beat chance (1/n_classes) by this much.
    min_gain_over_chance: float = 0.10
    min_accuracy: float = 0.0
    max_log_loss: float | None = None
    max_class_recall_drop: float | None = 0.25
    mcnemar_alpha: float | None = None  # None: no significance test
    # Budgets: candidates over them stay on the leaderboard, marked, and never reach the gate.
    max_model_mb: float | None = None  # model.keras size, 10^6 bytes
    max_latency_ms: float | None = None  # single-image CPU inference, median
    # force: retrain even when production was trained on this exact dataset (the gate still decides).
    force: bool = False
    # force_promote: promote even when checks fail (every failed check is still reported).
    force_promote: bool = False
    allow_label_change: bool = False
    # Human approval before a promotion (the DAG's release.approve task; ml.registry.approval). Off by
    # default; when on, a promotion the gate allows waits for an Airflow user's Approve, and Reject, no
    # answer within the timeout, or a run without Airflow (the CLI: nobody to ask) keeps production.
    require_approval: bool = False
    approval_timeout_hours: float = 24.0
    # Airflow user ids allowed to respond (the user name with the simple auth manager); empty: anyone who
    # may act on the DAG's task instances. Others get HTTP 403 from the REST API.
    approvers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(isinstance(self.require_approval, bool),
                 f"gate.require_approval must be true or false, got {self.require_approval!r}")
        hours = self.approval_timeout_hours
        _require(isinstance(hours, (int, float)) and not isinstance(hours, bool) and math.isfinite(hours)
                 and hours > 0, f"gate.approval_timeout_hours must be a number of hours > 0, got {hours!r}")
        object.__setattr__(self, "approval_timeout_hours", float(hours))
        approvers = () if self.approvers is None else self.approvers
        _require(not isinstance(approvers, str)
                 and all(isinstance(a, str) and a.strip() and a == a.strip() for a in approvers),
                 f"gate.approvers must be a list of Airflow user names (no blanks), got {self.approvers!r}")
        _require(len(set(approvers)) == len(tuple(approvers)), f"gate.approvers has duplicates: {list(approvers)}")
        object.__setattr__(self, "approvers", tuple(approvers))
        _require(self.metric in PRIMARY_METRICS,
                 f"gate.metric must be one of {PRIMARY_METRICS}, got {self.metric!r}")
        _require(self.min_delta >= 0, f"gate.min_delta must be >= 0, got {self.min_delta}")
        # Negative would promote a first model that is worse than guessing; 1 or more could never pass.
        _require(0 <= self.min_gain_over_chance < 1,
                 f"gate.min_gain_over_chance must be in [0, 1), got {self.min_gain_over_chance}")
        _require(0 <= self.min_accuracy <= 1, f"gate.min_accuracy must be in [0, 1], got {self.min_accuracy}")
        for name in ("max_model_mb", "max_latency_ms"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"gate.{name} must be > 0 or null, got {value}")
        if self.mcnemar_alpha is not None:
            _require(0 < self.mcnemar_alpha < 1,
                     f"gate.mcnemar_alpha must be in (0, 1) or null, got {self.mcnemar_alpha}")


@dataclass(frozen=True)
class SecurityConfig:
    """What a run may read when someone triggers it with parameters (see docs/security.md).

    Whoever can trigger the DAG chooses ``source`` and ``weights``, and the worker reads them with
    its own permissions: any folder, bucket or Kaggle dataset it can reach. A deployment that lets
    more people trigger than it trusts with the worker's reach lists what is allowed here.
    `None` allows anything (the default, for one-machine use).

    Attributes:
        allowed_sources: Prefixes a dataset source must start with, e.g. ``["s3://ml-data/",
            "kaggle:competitions/", "/data/datasets/"]``. Local paths are compared after resolving
            ``..`` and symlinks, so ``/data/datasets/../../etc`` does not pass.
        allowed_weights: Allowed ``train.weights`` values: exact names (``imagenet``, ``none``) or
            prefixes of files and ``s3://`` URIs.
    """

    allowed_sources: tuple[str, ...] | None = None
    allowed_weights: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("allowed_sources", "allowed_weights"):
            value = getattr(self, name)
            if value is None:
                continue
            _require(not isinstance(value, str) and all(isinstance(v, str) and v.strip() for v in value),
                     f"security.{name} must be a list of non-empty strings or null, got {value!r}")
            object.__setattr__(self, name, tuple(v.strip() for v in value))

    def check_source(self, source: str) -> None:
        """ConfigError unless `source` is allowed by `allowed_sources`."""
        if self.allowed_sources is None:
            return
        if _allowed(source, self.allowed_sources):
            return
        raise ConfigError(f"data source {source!r} is not allowed by security.allowed_sources "
                          f"{list(self.allowed_sources)}")

    def check_weights(self, weights: str) -> None:
        """ConfigError unless `weights` is allowed by `allowed_weights`."""
        if self.allowed_weights is None:
            return
        value = weights.strip()
        if value.lower() in {w.lower() for w in self.allowed_weights} or _allowed(value, self.allowed_weights):
            return
        raise ConfigError(f"train.weights {weights!r} is not allowed by security.allowed_weights "
                          f"{list(self.allowed_weights)}")


def _allowed(value: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `value` starts with one of `prefixes`; local paths are resolved first (``..``, links)."""
    text = value.strip()
    if "://" in text or text.startswith("kaggle:"):
        # URIs are compared as written, but a '..' segment could climb out of an allowed prefix.
        return ".." not in text.split("/") and any(text.startswith(p) for p in prefixes)
    resolved = os.path.realpath(os.path.expanduser(text))
    for prefix in prefixes:
        if "://" in prefix or prefix.startswith("kaggle:"):
            continue
        root = os.path.realpath(os.path.expanduser(prefix))
        if resolved == root or resolved.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


@dataclass(frozen=True)
class PipelineConfig:
    """Everything one pipeline run needs, validated."""

    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    work_dir: Path = field(default_factory=lambda: Path(os.environ.get("ML_WORK_DIR", REPO_ROOT / ".work")))

    def __post_init__(self) -> None:
        # Checked where the values are read: a trigger param can never build a config that reads
        # outside what the deployment allows (docs/security.md).
        if self.data.source:
            self.security.check_source(self.data.source)
        self.security.check_weights(self.train.weights)
        if self.search.enabled:
            from ml.training.search import check_search

            check_search(self)  # every choice and range end through the trial's training settings

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PipelineConfig:
        """Build from a nested mapping ({'storage': {...}, 'train': {...}, ...})."""
        sections = {"storage": StorageConfig, "data": DataConfig, "train": TrainConfig, "gate": GateConfig,
                    "security": SecurityConfig, "search": SearchConfig}
        unknown = set(raw) - set(sections) - {"work_dir"}
        _require(not unknown, f"unknown config sections {sorted(unknown)}; allowed: {sorted(sections)} and work_dir")
        kwargs: dict[str, Any] = {}
        for name, klass in sections.items():
            values = dict(raw.get(name) or {})
            allowed = {f.name for f in dataclasses.fields(klass)}
            bad = set(values) - allowed
            _require(not bad, f"unknown keys in config section {name!r}: {sorted(bad)}; allowed: {sorted(allowed)}")
            try:
                kwargs[name] = klass(**values)
            except TypeError as exc:  # wrong value types surface here
                raise ConfigError(f"invalid config section {name!r}: {exc}") from None
        if raw.get("work_dir"):
            kwargs["work_dir"] = Path(raw["work_dir"])
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
        """Defaults, then the YAML file (``ML_CONFIG`` or config/pipeline.yaml), then overrides.

        Environment: ``ML_S3_ENDPOINT_URL``, ``ML_S3_BUCKET`` and ``ML_WORK_DIR`` override the
        file, so a deployment can point the same config at its own store.
        """
        import yaml

        file = Path(path or os.environ.get("ML_CONFIG") or DEFAULT_CONFIG_FILE)
        raw: dict[str, Any] = {}
        if file.exists():
            with file.open() as fh:
                loaded = yaml.safe_load(fh) or {}
            _require(isinstance(loaded, dict), f"{file} must hold a mapping of sections, got {type(loaded).__name__}")
            raw = loaded
        elif path is not None:
            raise ConfigError(f"config file {file} does not exist")
        env_storage = {"endpoint_url": os.environ.get("ML_S3_ENDPOINT_URL"), "bucket": os.environ.get("ML_S3_BUCKET")}
        merged = deep_merge(raw, {"storage": {k: v for k, v in env_storage.items() if v}})
        if os.environ.get("ML_WORK_DIR"):
            merged["work_dir"] = os.environ["ML_WORK_DIR"]
        return cls.from_dict(deep_merge(merged, overrides or {}))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (for lineage and run reports)."""
        out = dataclasses.asdict(self)
        out["work_dir"] = str(self.work_dir)
        out["train"]["candidate_options"] = {k: dict(v) for k, v in self.train.candidate_options.items()}
        out["search"]["space"] = {k: dict(v) if isinstance(v, Mapping) else list(v)
                                  for k, v in self.search.space.items()}
        return out


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `extra` into a copy of `base`, recursing into nested mappings."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# Names shared by the DAGs (which build Airflow Assets from them) and the library.
PRODUCTION_ASSET_NAME = "image_classifier_production"
PRODUCTION_ASSET_URI = "x-model-registry://image-classifier/production.json"


def overrides_from_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a run's trigger params (DAG params or CLI flags) into config overrides.

    Unset (None/empty) values keep the config file's values, so a scheduled run with the
    default params behaves exactly like the file says.
    """
    mapping = {
        "source": ("data", "source"),
        "candidates": ("train", "candidates"),
        "epochs": ("train", "epochs"),
        "image_size": ("train", "image_size"),
        "batch_size": ("train", "batch_size"),
        "learning_rate": ("train", "learning_rate"),
        "weights": ("train", "weights"),
        "finetune_top_k": ("train", "finetune_top_k"),
        "finetune_epochs": ("train", "finetune_epochs"),
        "min_delta": ("gate", "min_delta"),
        "metric": ("gate", "metric"),
        "force": ("gate", "force"),
        "allow_label_change": ("gate", "allow_label_change"),
        "require_approval": ("gate", "require_approval"),
        "search": ("search", "enabled"),
    }
    out: dict[str, Any] = {}
    for name, (section, key) in mapping.items():
        value = params.get(name)
        if value is None or value == "" or value == []:
            continue
        out.setdefault(section, {})[key] = tuple(value) if isinstance(value, list) else value
    return out
