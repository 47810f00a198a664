"""The data-quality gate: a Great Expectations suite over the manifest and its aggregates.

GX runs on four small pandas frames from an ephemeral context (nothing written by GX itself):

- ``manifest``: every row — schema, labels present, no label conflicts, duplicates (warning);
- ``ok_images``: ok rows — sizes, allowed labels, every ok file decoded;
- ``per_class``: one row per class — images per class (failing minimum, warning minimum);
- ``dataset``: one row — number of classes, quarantined fraction, imbalance, near-duplicate leaks.

Every expectation carries ``meta.severity`` "failing" or "warning" (and GX's own ``severity``).
GX decides pass/fail; the sentences in the report are written from the same frames, so they
can name classes and numbers ("class 'x' has 3 ok images, minimum is 5").

The HTML page (`render_html`) is ours, not GX's Data Docs: GX's page template loads eight scripts
and stylesheets from public CDNs and printed an unexpected label such as ``<script>…`` unescaped,
on a page served under the Airflow origin. Ours is one self-contained file, without script, with
every value from the data escaped, and it carries what the GX page showed besides the verdicts:
each expectation's rule, observed value, unexpected count and a few unexpected examples.
"""

from __future__ import annotations

import html
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.data.extract import shown_name
from ml.data.manifest import COLUMNS, DUPLICATE, LABEL_CONFLICT, OK
from ml.data.near_duplicates import NearDuplicates, near_duplicate_groups
from ml.errors import DataError, DataQualityError

if TYPE_CHECKING:
    import pandas as pd

    from ml.config import DataConfig

log = logging.getLogger(__name__)

FAILING = "failing"
WARNING = "warning"
MAX_LISTED_FAILURES = 10
MAX_LEAK_EXAMPLES = 3
# Same characters as ml.data.extract.CONTROL_CHARACTERS, spelled with escapes so the
# expectation's JSON and Data Docs page show it readably.
LABEL_CONTROL_REGEX = r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]"
MANIFEST_FILE = "manifest.parquet"


@dataclass
class QualityReport:
    """Outcome of `validate_dataset`."""

    success: bool
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    statistics: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """A few human lines for task logs."""
        s = self.statistics
        head = (
            f"data quality {'PASSED' if self.success else 'FAILED'}: {s.get('n_ok', 0)} ok of "
            f"{s.get('n_images', 0)} images, {s.get('n_classes', 0)} classes, "
            f"{len(self.failures)} failure(s), {len(self.warnings)} warning(s)"
        )
        lines = [head]
        lines += [f"  FAIL {m}" for m in self.failures[:MAX_LISTED_FAILURES]]
        if len(self.failures) > MAX_LISTED_FAILURES:
            lines.append(f"  ... and {len(self.failures) - MAX_LISTED_FAILURES} more failures")
        lines += [f"  WARN {m}" for m in self.warnings[:MAX_LISTED_FAILURES]]
        if len(self.warnings) > MAX_LISTED_FAILURES:
            lines.append(f"  ... and {len(self.warnings) - MAX_LISTED_FAILURES} more warnings")
        return "\n".join(lines)

    def raise_for_failures(self) -> None:
        """Raise DataQualityError (listing up to 10 failures) unless the suite passed."""
        if self.success:
            return
        listed = "; ".join(self.failures[:MAX_LISTED_FAILURES])
        more = len(self.failures) - MAX_LISTED_FAILURES
        message = f"data quality suite failed with {len(self.failures)} failure(s): {listed}"
        if more > 0:
            message += f"; ... and {more} more"
        raise DataQualityError(message, self.failures)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (quality.json)."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Frames and statistics (pure pandas; no GX)


def _per_class(manifest: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    ok = manifest[manifest["status"] == OK]
    counts = ok.groupby("label").size() if not ok.empty else pd.Series(dtype="int64")
    frame = pd.DataFrame({"label": counts.index.astype(str), "n_ok": counts.to_numpy(dtype="int64")})
    if "split" in ok.columns:
        for split in ("train", "val", "test"):
            per = ok[ok["split"] == split].groupby("label").size()
            frame[f"n_{split}"] = [int(per.get(label, 0)) for label in frame["label"]]
    return frame.sort_values("label", kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class _Leaks:
    """Near-duplicate groups that straddle train and test (`assign_splits` keeps groups together)."""

    groups: int
    pairs: int  # (train image, test image) pairs inside those groups
    examples: list[tuple[int, int]]  # (train row, test row) positions, one per group, at most MAX_LEAK_EXAMPLES


def _leaks(manifest: pd.DataFrame, near: NearDuplicates) -> _Leaks:
    import numpy as np

    splits = manifest["split"].to_numpy()
    group = near.group
    in_train = (group >= 0) & (splits == "train")
    in_test = (group >= 0) & (splits == "test")
    train = np.bincount(group[in_train], minlength=near.n_groups)
    test = np.bincount(group[in_test], minlength=near.n_groups)
    straddling = np.flatnonzero((train > 0) & (test > 0))
    examples = [
        (int(np.flatnonzero(in_train & (group == g))[0]), int(np.flatnonzero(in_test & (group == g))[0]))
        for g in straddling[:MAX_LEAK_EXAMPLES]
    ]
    return _Leaks(len(straddling), int((train[straddling] * test[straddling]).sum()), examples)


def _statistics(
    manifest: pd.DataFrame,
    per_class: pd.DataFrame,
    near: NearDuplicates | None,
    leaks: _Leaks | None,
) -> dict[str, Any]:
    ok = manifest[manifest["status"] == OK]
    n = len(manifest)
    counts = per_class["n_ok"] if not per_class.empty else None
    stats: dict[str, Any] = {
        "n_images": int(n),
        "n_ok": int(len(ok)),
        "n_quarantined": int(n - len(ok)),
        "quarantined_fraction": round((n - len(ok)) / n, 6) if n else 0.0,
        "n_classes": int(len(per_class)),
        "status_counts": {str(k): int(v) for k, v in manifest["status"].value_counts().items()},
        "images_per_class": {str(r.label): int(r.n_ok) for r in per_class.itertuples()},
        "min_images_per_class": int(counts.min()) if counts is not None else 0,
        "max_images_per_class": int(counts.max()) if counts is not None else 0,
        "imbalance_ratio": round(float(counts.max() / counts.min()), 4) if counts is not None else 0.0,
    }
    if not ok.empty:
        stats["min_width"], stats["min_height"] = int(ok["width"].min()), int(ok["height"].min())
        stats["formats"] = {str(k): int(v) for k, v in ok["format"].value_counts().items()}
    if "split" in manifest.columns:
        stats["splits"] = {s: int((ok["split"] == s).sum()) for s in ("train", "val", "test")}
    if near is not None:
        stats["near_duplicate_groups"] = near.n_groups
        stats["near_duplicate_images"] = near.n_images
    if leaks is not None:
        stats["near_duplicates_across_train_test"] = leaks.pairs
        stats["near_duplicate_groups_across_train_test"] = leaks.groups
    return stats


# ---------------------------------------------------------------------------------------------
# The suite


@dataclass
class _Check:
    """One expectation plus how to say its failure in words."""

    name: str
    frame: str
    severity: str
    expectation: Any
    explain: Any  # () -> list[str]


def _build_checks(
    config: DataConfig,
    frames: dict[str, pd.DataFrame],
    stats: dict[str, Any],
    leaks: _Leaks | None,
) -> list[_Check]:
    import great_expectations as gx

    ge = gx.expectations
    manifest, ok, per_class = frames["manifest"], frames["ok_images"], frames["per_class"]
    checks: list[_Check] = []

    def add(name: str, frame: str, severity: str, cls: Any, explain: Any, **kwargs: Any) -> None:
        exp = cls(
            **kwargs,
            meta={"severity": severity, "check": name},
            severity="critical" if severity == FAILING else "warning",
        )
        checks.append(_Check(name, frame, severity, exp, explain))

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
    add(
        "no_label_conflicts",
        "manifest",
        FAILING,
        ge.ExpectColumnValuesToNotBeInSet,
        lambda: [
            f"{len(paths_with(LABEL_CONFLICT))} image(s) have identical bytes under different labels "
            f"(label conflict), e.g. {paths_with(LABEL_CONFLICT)[:3]}"
        ],
        column="status",
        value_set=[LABEL_CONFLICT],
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
    add(
        "min_width",
        "ok_images",
        FAILING,
        ge.ExpectColumnValuesToBeBetween,
        lambda: [
            f"{int((ok['width'] < config.min_width).sum())} ok image(s) are narrower than "
            f"{config.min_width} px (smallest {stats.get('min_width')} px), e.g. "
            f"{ok.loc[ok['width'] < config.min_width, 'path'].head(3).tolist()}"
        ],
        column="width",
        min_value=config.min_width,
    )
    add(
        "min_height",
        "ok_images",
        FAILING,
        ge.ExpectColumnValuesToBeBetween,
        lambda: [
            f"{int((ok['height'] < config.min_height).sum())} ok image(s) are shorter than "
            f"{config.min_height} px (smallest {stats.get('min_height')} px), e.g. "
            f"{ok.loc[ok['height'] < config.min_height, 'path'].head(3).tolist()}"
        ],
        column="height",
        min_value=config.min_height,
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


def _run_suites(
    checks: list[_Check], frames: dict[str, pd.DataFrame]
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


def validate_dataset(dataset_dir: Path, config: DataConfig, *, out_dir: Path | None = None) -> QualityReport:
    """Run the quality suite on ``<dataset_dir>/manifest.parquet``.

    Args:
        dataset_dir: A dataset folder written by `ml.data.ingest.ingest`.
        config: Thresholds (min_classes, min_images_per_class, max_quarantined_fraction, ...).
        out_dir: When given, ``quality.json`` and ``quality.html`` (self-contained, no script) are
            written there.

    Returns:
        The report; call `raise_for_failures()` to stop a pipeline on failing checks.
    """
    import pandas as pd

    started = time.monotonic()
    path = Path(dataset_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"no {MANIFEST_FILE} in {dataset_dir}: run ingest first")
    manifest = pd.read_parquet(path)
    missing = [c for c in COLUMNS if c not in manifest.columns]
    if missing:
        # Nothing else can be checked meaningfully; still reported (not raised) like any failure.
        message = f"{path} lacks column(s) {missing}; columns found: {list(manifest.columns)}"
        report = QualityReport(
            False, [message], [], {"n_images": len(manifest)}, {"schema": {"missing": missing}}
        )
        _finish(report, out_dir, started)
        return report

    per_class = _per_class(manifest)
    has_splits = bool(manifest["split"].isin(["train", "val", "test"]).any())
    near = near_duplicate_groups(manifest)
    leaks = _leaks(manifest, near) if has_splits else None
    stats = _statistics(manifest, per_class, near, leaks)
    dataset_row = {
        k: [stats[k]]
        for k in ("n_images", "n_ok", "n_quarantined", "quarantined_fraction", "n_classes", "imbalance_ratio")
    }
    dataset_row["near_duplicates_across_train_test"] = [leaks.pairs if leaks is not None else 0]
    frames = {
        "manifest": manifest,
        "ok_images": manifest[manifest["status"] == OK].reset_index(drop=True),
        "per_class": per_class,
        "dataset": pd.DataFrame(dataset_row),
    }
    checks = _build_checks(config, frames, stats, leaks)
    results, outcome = _run_suites(checks, frames)

    failures: list[str] = []
    warnings: list[str] = []
    for check in checks:
        if outcome.get(check.name, False):
            continue
        sentences = check.explain() if check.name in outcome else [f"check {check.name} did not run"]
        (failures if check.severity == FAILING else warnings).extend(sentences)
    if "n_classes" in stats and stats["n_ok"] == 0:
        failures.insert(0, "no ok images at all")
    result = {
        "success": not failures,
        "checks": [
            {
                "check": c.name,
                "frame": c.frame,
                "severity": c.severity,
                "success": outcome.get(c.name, False),
                "expectation": c.expectation.expectation_type,
            }
            for c in checks
        ],
        "suites": {name: r.to_json_dict() for name, r in results.items()},
    }
    report = QualityReport(not failures, failures, warnings, stats, _jsonable(result))
    _finish(report, out_dir, started)
    return report


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _finish(report: QualityReport, out_dir: Path | None, started: float) -> None:
    log.info("%s (%.1f s)", report.summary(), time.monotonic() - started)
    if out_dir is None:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "quality.json", json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    _write_atomic(out_dir / "quality.html", render_html(report))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# How much of the data the page repeats: a value_set of 120 breeds or a 50 kB label would bury
# the table; quality.json keeps everything.
_MAX_RULE_VALUES = 10
_MAX_EXAMPLES = 5
_MAX_VALUE_CHARS = 200


def _clip(text: str, limit: int = _MAX_VALUE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _show(value: Any) -> str:
    """One value as short text (strings as they are, the rest as JSON); not yet escaped."""
    if isinstance(value, str):
        return _clip(value)
    return _clip(json.dumps(value, ensure_ascii=False, default=str))


def _expectation_details(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per check name: GX's kwargs, result block and exception info, from the suites' JSON."""
    details: dict[str, dict[str, Any]] = {}
    for suite in (result.get("suites") or {}).values():
        items = suite.get("results") if isinstance(suite, dict) else None
        for item in items or []:
            config = item.get("expectation_config") or {}
            name = (config.get("meta") or {}).get("check")
            if name:
                details[str(name)] = {
                    "kwargs": config.get("kwargs") or {},
                    "result": item.get("result") or {},
                    "exception": item.get("exception_info") or {},
                }
    return details


def _rule_text(kwargs: dict[str, Any]) -> str:
    parts = []
    for key, value in kwargs.items():
        if key in ("batch_id", "column"):
            continue
        if isinstance(value, list):
            # Items JSON-quoted: a label may itself contain ", ".
            shown = ", ".join(_show(json.dumps(v, ensure_ascii=False, default=str)) for v in value[:_MAX_RULE_VALUES])
            more = f", … {len(value) - _MAX_RULE_VALUES} more" if len(value) > _MAX_RULE_VALUES else ""
            parts.append(f"{key}: [{shown}{more}]")
        else:
            parts.append(f"{key}: {_show(value)}")
    return "; ".join(parts)


def _observed_text(result: dict[str, Any]) -> str:
    if "observed_value" in result:
        return _show(result["observed_value"])
    if "unexpected_count" in result:
        percent = result.get("unexpected_percent")
        share = f" ({percent:.1f}%)" if isinstance(percent, (int, float)) else ""
        return f"{result['unexpected_count']} of {result.get('element_count', '?')} unexpected{share}"
    return ""


def _examples_html(result: dict[str, Any]) -> str:
    e = html.escape
    counts = result.get("partial_unexpected_counts") or []
    if counts:
        items = [f"<li><code>{e(_show(c.get('value')))}</code> × {e(str(c.get('count')))}</li>"
                 for c in counts[:_MAX_EXAMPLES]]
    else:
        items = [f"<li><code>{e(_show(v))}</code></li>"
                 for v in (result.get("partial_unexpected_list") or [])[:_MAX_EXAMPLES]]
    return f"<ul class='examples'>{''.join(items)}</ul>" if items else ""


def render_html(report: QualityReport) -> str:
    """A self-contained HTML page of the report: no script, no external assets, data escaped.

    Besides the verdict, failures and statistics, each expectation's row shows its rule, what GX
    observed, how many values were unexpected and up to five of them (a value GX saw, such as a
    label outside data.allowed_labels, is data: it is escaped like everything else).
    """
    e = html.escape  # quote=True: safe inside attribute values too
    colour = "#1a7f37" if report.success else "#cf222e"
    items = "".join(f"<li class='fail'>{e(m)}</li>" for m in report.failures)
    items += "".join(f"<li class='warn'>{e(m)}</li>" for m in report.warnings)

    def cell(v: Any) -> str:
        return e(json.dumps(v, ensure_ascii=False) if isinstance(v, dict) else str(v))

    stats_rows = "".join(
        f"<tr><th>{e(str(k))}</th><td>{cell(v)}</td></tr>"
        for k, v in report.statistics.items()
        if k != "images_per_class"
    )
    per_class = report.statistics.get("images_per_class", {})
    class_rows = "".join(f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in per_class.items())
    details = _expectation_details(report.result)
    check_rows = []
    for c in report.result.get("checks", []):
        found = details.get(str(c["check"]), {})
        result, exception = found.get("result") or {}, found.get("exception") or {}
        column = (found.get("kwargs") or {}).get("column")
        observed = e(_observed_text(result))
        if exception.get("raised_exception"):
            observed = f"could not run: {e(_show(exception.get('exception_message') or ''))}"
        outcome = "ok" if c["success"] else str(c["severity"])
        check_rows.append(
            f"<tr><td>{e(str(c['check']))}</td><td>{e(str(c['expectation']))}</td>"
            f"<td>{e(str(c['frame']))}{'.' + e(str(column)) if column else ''}</td>"
            f"<td>{e(_rule_text(found.get('kwargs') or {}))}</td><td>{observed}</td>"
            f"<td>{_examples_html(result)}</td><td>{e(str(c['severity']))}</td>"
            f"<td class='{e(outcome)}'>{'pass' if c['success'] else 'FAIL'}</td></tr>"
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Data quality report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #1f2328; }}
h1 span {{ color: {colour}; }} table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }}
li.fail, td.failing {{ color: #cf222e; }} li.warn, td.warning {{ color: #9a6700; }}
td.ok {{ color: #1a7f37; }} ul.examples {{ margin: 0; padding-left: 1.2em; }}
td {{ overflow-wrap: anywhere; max-width: 28em; }}
</style></head><body>
<h1>Data quality: <span>{"PASSED" if report.success else "FAILED"}</span></h1>
<p>{len(report.failures)} failure(s), {len(report.warnings)} warning(s).</p>
<ul>{items}</ul>
<h2>Expectations</h2>
<table><tr><th>check</th><th>expectation</th><th>data</th><th>rule</th><th>observed</th>
<th>unexpected examples</th><th>severity</th><th>result</th></tr>{"".join(check_rows)}</table>
<h2>Statistics</h2><table>{stats_rows}</table>
<h2>Ok images per class</h2><table><tr><th>class</th><th>images</th></tr>{class_rows}</table>
</body></html>
"""
