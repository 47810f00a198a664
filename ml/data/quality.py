"""The data-quality gate: a Great Expectations suite over the manifest and its aggregates.

GX runs on four small pandas frames built here (`ml.data.quality_suite` holds the expectations):

- ``manifest``: every row — schema, labels present, label conflicts and duplicates (warnings);
- ``ok_images``: ok rows — sizes, allowed labels, every ok file decoded;
- ``per_class``: one row per class — images per class (failing minimum, warning minimum);
- ``dataset``: one row — number of classes, quarantined and label-conflict fractions, imbalance,
  near-duplicate leaks.

The outcome is a `QualityReport`, written as ``quality.json`` and as the self-contained
``quality.html`` of `ml.data.quality_page`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.data.manifest import COLUMNS, LABEL_CONFLICT, MANIFEST_FILE, OK
from ml.data.near_duplicates import NearDuplicates, near_duplicate_groups
from ml.data.quality_page import render_html
from ml.data.quality_suite import FAILING, build_checks, conflict_text, run_suites
from ml.errors import DataError, DataQualityError
from ml.io import to_jsonable, write_atomic, write_json

if TYPE_CHECKING:
    import pandas as pd

    from ml.config import DataConfig

log = logging.getLogger(__name__)

MAX_LISTED_FAILURES = 10
MAX_LEAK_EXAMPLES = 3
# quality.json, the run report and XCom list at most this many label-conflict groups (each a few
# files); the count and fraction always cover all of them.
MAX_LISTED_CONFLICT_GROUPS = 50


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
        for tag, messages, noun in (("FAIL", self.failures, "failures"), ("WARN", self.warnings, "warnings")):
            lines += [f"  {tag} {m}" for m in messages[:MAX_LISTED_FAILURES]]
            if len(messages) > MAX_LISTED_FAILURES:
                lines.append(f"  ... and {len(messages) - MAX_LISTED_FAILURES} more {noun}")
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
class Leaks:
    """Near-duplicate groups that straddle train and test (`assign_splits` keeps groups together)."""

    groups: int
    pairs: int  # (train image, test image) pairs inside those groups
    examples: list[tuple[int, int]]  # (train row, test row) positions, one per group, at most MAX_LEAK_EXAMPLES


def _leaks(manifest: pd.DataFrame, near: NearDuplicates) -> Leaks:
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
    return Leaks(len(straddling), int((train[straddling] * test[straddling]).sum()), examples)


def label_conflicts(manifest: pd.DataFrame, limit: int = MAX_LISTED_CONFLICT_GROUPS) -> list[dict[str, Any]]:
    """Groups of files with identical bytes under different labels, by sha256 then path.

    Returns:
        Up to `limit` groups ``{"sha256", "files": [{"path", "label"}, ...]}``.
    """
    rows = manifest[manifest["status"] == LABEL_CONFLICT].sort_values(["sha256", "path"], kind="stable")
    groups = []
    for sha, group in rows.groupby("sha256", sort=True):
        if len(groups) == limit:
            break
        files = [{"path": str(p), "label": str(lb)} for p, lb in zip(group["path"], group["label"], strict=True)]
        groups.append({"sha256": str(sha), "files": files})
    return groups


def _statistics(
    manifest: pd.DataFrame,
    per_class: pd.DataFrame,
    near: NearDuplicates | None,
    leaks: Leaks | None,
) -> dict[str, Any]:
    ok = manifest[manifest["status"] == OK]
    n = len(manifest)
    n_conflicts = int((manifest["status"] == LABEL_CONFLICT).sum())
    counts = per_class["n_ok"] if not per_class.empty else None
    stats: dict[str, Any] = {
        "n_images": int(n),
        "n_ok": int(len(ok)),
        "n_quarantined": int(n - len(ok)),
        "quarantined_fraction": round((n - len(ok)) / n, 6) if n else 0.0,
        "n_label_conflicts": n_conflicts,
        "label_conflict_fraction": round(n_conflicts / n, 6) if n else 0.0,
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
    stats["label_conflicts"] = label_conflicts(manifest)
    if stats["n_label_conflicts"]:
        log.warning("label conflict: %d image(s) quarantined, identical bytes under different labels: %s",
                    stats["n_label_conflicts"], conflict_text(stats["label_conflicts"]))
    dataset_row = {
        k: [stats[k]]
        for k in ("n_images", "n_ok", "n_quarantined", "quarantined_fraction", "label_conflict_fraction",
                  "n_classes", "imbalance_ratio")
    }
    dataset_row["near_duplicates_across_train_test"] = [leaks.pairs if leaks is not None else 0]
    frames = {
        "manifest": manifest,
        "ok_images": manifest[manifest["status"] == OK].reset_index(drop=True),
        "per_class": per_class,
        "dataset": pd.DataFrame(dataset_row),
    }
    checks = build_checks(config, frames, stats, leaks)
    results, outcome = run_suites(checks, frames)

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
    report = QualityReport(not failures, failures, warnings, stats, to_jsonable(result))
    _finish(report, out_dir, started)
    return report


def _finish(report: QualityReport, out_dir: Path | None, started: float) -> None:
    log.info("%s (%.1f s)", report.summary(), time.monotonic() - started)
    if out_dir is None:
        return
    write_json(Path(out_dir) / "quality.json", report.to_dict(), sort_keys=False)
    write_atomic(Path(out_dir) / "quality.html", render_html(report))
