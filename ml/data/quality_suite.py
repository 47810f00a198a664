"""The quality suite: Great Expectations expectations over the dataset's four frames, and running them.

Each `Check` is one GX expectation on one frame (``manifest``, ``ok_images``, ``per_class``,
``dataset``; see `ml.data.quality`), with ``meta.severity`` "failing" or "warning" (and GX's own
``severity``), plus a function that says its failure in words from the same frames, so a message
can name classes and numbers ("class 'x' has 3 ok images, minimum is 5"). GX decides pass/fail.
GX runs from an ephemeral context: nothing is written by GX itself, nothing goes to the network.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ml.data.extract import shown_name
from ml.data.manifest import DUPLICATE, LABEL_CONFLICT, OK

if TYPE_CHECKING:
    import pandas as pd

    from ml.config import DataConfig
    from ml.data.quality import Leaks

log = logging.getLogger(__name__)

FAILING = "failing"
WARNING = "warning"
# Same characters as ml.data.extract.CONTROL_CHARACTERS, spelled with escapes so the
# expectation's JSON and the quality page show it readably.
LABEL_CONTROL_REGEX = r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]"
# Label-conflict groups a message names file by file (quality.json lists more).
MAX_NAMED_CONFLICT_GROUPS = 10


@dataclass
class Check:
    """One expectation plus how to say its failure in words."""

    name: str
    frame: str
    severity: str
    expectation: Any
    explain: Callable[[], list[str]]


def build_checks(
    config: DataConfig,
    frames: dict[str, pd.DataFrame],
    stats: dict[str, Any],
    leaks: Leaks | None,
) -> list[Check]:
    """The suite for one dataset: failing checks first, then warnings.

    Args:
        config: Thresholds (``data.*``) the expectations compare with.
        frames: The four frames by name (``manifest``, ``ok_images``, ``per_class``, ``dataset``).
        stats: `ml.data.quality`'s statistics, quoted by the sentences.
        leaks: Near-duplicate groups across train and test; None when the dataset has no splits
            (the leak check is then left out).
    """
    import great_expectations as gx

    ge = gx.expectations
    manifest, ok, per_class = frames["manifest"], frames["ok_images"], frames["per_class"]
    checks: list[Check] = []

    def add(name: str, frame: str, severity: str, cls: Any, explain: Callable[[], list[str]], **kwargs: Any) -> None:
        exp = cls(
            **kwargs,
            meta={"severity": severity, "check": name},
            severity="critical" if severity == FAILING else "warning",
        )
        checks.append(Check(name, frame, severity, exp, explain))

    empty_label = manifest["label"].fillna("").astype(str) == ""

    def paths_with(status: str) -> list[str]:
        return manifest.loc[manifest["status"] == status, "path"].astype(str).tolist()

    add(
        "labels_present",
        "manifest",
        FAILING,
        ge.ExpectColumnValueLengthsToBeBetween,
        lambda: [
            f"{int(empty_label.sum())} image(s) have an empty label, "
            f"e.g. {manifest.loc[empty_label, 'path'].head(3).tolist()}"
        ],
        column="label",
        min_value=1,
    )
    add(
        "labels_not_null",
        "manifest",
        FAILING,
        ge.ExpectColumnValuesToNotBeNull,
        lambda: [f"{int(manifest['label'].isna().sum())} image(s) have no label"],
        column="label",
    )
    conflicts = stats.get("label_conflicts", [])
    add(
        "label_conflict_fraction",
        "dataset",
        FAILING,
        ge.ExpectColumnValuesToBeBetween,
        lambda: [
            f"{stats['n_label_conflicts']} of {stats['n_images']} images ({stats['label_conflict_fraction']:.1%}) "
            f"have identical bytes under different labels (label conflict), more than "
            f"data.max_label_conflict_fraction={config.max_label_conflict_fraction:.1%}: fix the labels or raise "
            f"the setting; {conflict_text(conflicts)}"
        ],
        column="label_conflict_fraction",
        max_value=config.max_label_conflict_fraction,
    )
    add(
        "quarantined_fraction",
        "dataset",
        FAILING,
        ge.ExpectColumnValuesToBeBetween,
        lambda: [
            f"{stats['n_quarantined']} of {stats['n_images']} images are quarantined "
            f"({stats['quarantined_fraction']:.1%}), maximum is {config.max_quarantined_fraction:.1%} "
            f"(statuses: { {k: v for k, v in stats['status_counts'].items() if k != OK} })"
        ],
        column="quarantined_fraction",
        max_value=config.max_quarantined_fraction,
    )
    add(
        "min_classes",
        "dataset",
        FAILING,
        ge.ExpectColumnValuesToBeBetween,
        lambda: [
            f"the dataset has {stats['n_classes']} class(es) with ok images, minimum is {config.min_classes}"
        ],
        column="n_classes",
        min_value=config.min_classes,
    )
    add(
        "max_classes",
        "dataset",
        FAILING,
        ge.ExpectColumnValuesToBeBetween,
        lambda: [
            f"the dataset has {stats['n_classes']} class(es) with ok images, more than "
            f"data.max_classes={config.max_classes}"
        ],
        column="n_classes",
        max_value=config.max_classes,
    )
    ok_labels = ok["label"].fillna("").astype(str)
    long_label = ok_labels.str.len() > config.max_label_chars
    control_label = ok_labels.str.contains(LABEL_CONTROL_REGEX, regex=True)

    def label_examples(mask: pd.Series) -> str:
        return ", ".join(shown_name(x) for x in ok_labels[mask].head(3))

    add(
        "label_length",
        "ok_images",
        FAILING,
        ge.ExpectColumnValueLengthsToBeBetween,
        lambda: [
            f"{int(long_label.sum())} ok image(s) have a label longer than data.max_label_chars="
            f"{config.max_label_chars} characters, e.g. {label_examples(long_label)}"
        ],
        column="label",
        max_value=config.max_label_chars,
    )
    add(
        "label_characters",
        "ok_images",
        FAILING,
        ge.ExpectColumnValuesToNotMatchRegex,
        lambda: [
            f"{int(control_label.sum())} ok image(s) have a label with control characters, e.g. "
            f"{label_examples(control_label)}"
        ],
        column="label",
        regex=LABEL_CONTROL_REGEX,
    )
    add(
        "min_images_per_class",
        "per_class",
        FAILING,
        ge.ExpectColumnValuesToBeBetween,
        lambda: [
            f"class {r.label!r} has {r.n_ok} ok images, minimum is {config.min_images_per_class}"
            for r in per_class.itertuples()
            if r.n_ok < config.min_images_per_class
        ],
        column="n_ok",
        min_value=config.min_images_per_class,
    )

    def too_small(dim: str, word: str, limit: int) -> Callable[[], list[str]]:
        def explain() -> list[str]:
            small = ok[dim] < limit
            return [
                f"{int(small.sum())} ok image(s) are {word} than {limit} px (smallest "
                f"{stats.get(f'min_{dim}')} px), e.g. {ok.loc[small, 'path'].head(3).tolist()}"
            ]

        return explain

    for dim, word, limit in (("width", "narrower", config.min_width), ("height", "shorter", config.min_height)):
        add(
            f"min_{dim}",
            "ok_images",
            FAILING,
            ge.ExpectColumnValuesToBeBetween,
            too_small(dim, word, limit),
            column=dim,
            min_value=limit,
        )
    add(
        "ok_images_decoded",
        "ok_images",
        FAILING,
        ge.ExpectColumnValuesToBeBetween,
        lambda: [f"{int((ok['channels'] < 1).sum())} image(s) marked ok have no decoded channels"],
        column="channels",
        min_value=1,
        max_value=4,
    )
    add(
        "ok_images_hashed",
        "ok_images",
        FAILING,
        ge.ExpectColumnValueLengthsToEqual,
        lambda: [
            f"{int((ok['phash'].astype(str).str.len() != 16).sum())} image(s) marked ok have no pHash "
            "(not decoded)"
        ],
        column="phash",
        value=16,
    )
    if config.allowed_labels is not None:
        allowed = sorted(config.allowed_labels)
        add(
            "allowed_labels",
            "ok_images",
            FAILING,
            ge.ExpectColumnValuesToBeInSet,
            lambda: [
                f"label(s) {sorted(set(ok['label']) - set(allowed))} are not in data.allowed_labels {allowed}"
            ],
            column="label",
            value_set=allowed,
        )
    if leaks is not None:

        def leak_text() -> list[str]:
            paths = manifest["path"].astype(str).to_numpy()
            examples = [f"{paths[i]} ~ {paths[j]}" for i, j in leaks.examples]
            return [
                f"{leaks.pairs} near-duplicate pair(s) straddle train and test (leakage) in {leaks.groups} "
                f"near-duplicate group(s), e.g. {examples}"
            ]

        add(
            "no_near_duplicate_leaks",
            "dataset",
            FAILING,
            ge.ExpectColumnValuesToBeBetween,
            leak_text,
            column="near_duplicates_across_train_test",
            max_value=0,
        )

    add(
        "imbalance",
        "dataset",
        WARNING,
        ge.ExpectColumnValuesToBeBetween,
        lambda: [
            f"classes are imbalanced: largest has {stats['max_images_per_class']} ok images, smallest "
            f"{stats['min_images_per_class']} (ratio {stats['imbalance_ratio']:.1f}, warning above "
            f"{config.warn_imbalance_ratio:g})"
        ],
        column="imbalance_ratio",
        max_value=config.warn_imbalance_ratio,
    )
    add(
        "recommended_images_per_class",
        "per_class",
        WARNING,
        ge.ExpectColumnValuesToBeBetween,
        lambda: [
            f"class {r.label!r} has {r.n_ok} ok images, fewer than the recommended "
            f"{config.warn_images_per_class}"
            for r in per_class.itertuples()
            if r.n_ok < config.warn_images_per_class
        ],
        column="n_ok",
        min_value=config.warn_images_per_class,
    )
    add(
        "no_label_conflicts",
        "manifest",
        WARNING,
        ge.ExpectColumnValuesToNotBeInSet,
        lambda: [
            f"{stats['n_label_conflicts']} image(s) with identical bytes under different labels were quarantined "
            f"(label conflict; not trained or tested on): {conflict_text(conflicts)}"
        ],
        column="status",
        value_set=[LABEL_CONFLICT],
    )
    add(
        "no_duplicates",
        "manifest",
        WARNING,
        ge.ExpectColumnValuesToNotBeInSet,
        lambda: [
            f"{len(paths_with(DUPLICATE))} duplicate file(s) (same bytes, same label) were set aside, "
            f"e.g. {paths_with(DUPLICATE)[:3]}"
        ],
        column="status",
        value_set=[DUPLICATE],
    )
    return checks


def conflict_text(groups: list[dict[str, Any]], limit: int = MAX_NAMED_CONFLICT_GROUPS) -> str:
    """``'a.jpg' ('cat') = 'b.jpg' ('dog'); ...`` for the first `limit` groups, names quoted."""
    shown = [
        " = ".join(f"{shown_name(f['path'])} ({shown_name(f['label'])})" for f in group["files"])
        for group in groups[:limit]
    ]
    more = len(groups) - limit
    return "; ".join(shown) + (f"; ... and {more} more group(s)" if more > 0 else "")


def _gx_context() -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # Offline and quiet: no analytics calls, no progress bars in task logs, nothing on disk.
    config = DataContextConfig(
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def run_suites(
    checks: list[Check], frames: dict[str, pd.DataFrame]
) -> tuple[dict[str, Any], dict[str, bool]]:
    """Validate each frame with its suite; (GX results per frame, success per check name)."""
    import great_expectations as gx

    context = _gx_context()
    source = context.data_sources.add_pandas("dataset")
    results: dict[str, Any] = {}
    outcome: dict[str, bool] = {}
    for frame_name, frame in frames.items():
        mine = [c for c in checks if c.frame == frame_name]
        if not mine:
            continue
        asset = source.add_dataframe_asset(frame_name)
        batch_def = asset.add_batch_definition_whole_dataframe(f"{frame_name}_all")
        suite = context.suites.add(
            gx.ExpectationSuite(
                name=f"dataset_quality_{frame_name}", expectations=[c.expectation for c in mine]
            )
        )
        batch = batch_def.get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(suite, result_format="SUMMARY")
        results[frame_name] = result
        for r in result.results:
            name = (r.expectation_config.meta or {}).get("check")
            raised = bool((r.exception_info or {}).get("raised_exception"))
            outcome[name] = bool(r.success) and not raised
            if raised:
                log.warning(
                    "quality check %s could not run: %s",
                    name,
                    (r.exception_info or {}).get("exception_message"),
                )
    return results, outcome
