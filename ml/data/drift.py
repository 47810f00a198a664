"""Drift between this run's dataset and the one the production model was trained on.

A profile is a small JSON summary of a dataset (class counts, image size statistics) stored
with every promoted version as `dataset_profile.json`; the next run compares against it and
puts the differences in its report, so a changed class balance or a new camera does not go
unnoticed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ml.data.manifest import DATASET_FILE, MANIFEST_FILE, OK

# Total variation distance between class distributions above which the report warns
# (0.1 = a tenth of the probability mass moved between classes).
TVD_WARNING = 0.10
SIZE_CHANGE_WARNING = 0.25  # relative change of the median width or height


def dataset_profile(dataset_dir: str | Path) -> dict[str, Any]:
    """Class counts and image size statistics of the `ok` images of a dataset folder."""
    import pandas as pd

    dataset_dir = Path(dataset_dir)
    meta = json.loads((dataset_dir / DATASET_FILE).read_text(encoding="utf-8"))
    manifest = pd.read_parquet(dataset_dir / MANIFEST_FILE, columns=["label", "width", "height", "status"])
    ok = manifest[manifest["status"] == OK]
    counts = {str(k): int(v) for k, v in ok["label"].value_counts().sort_index().items()}
    return {
        "dataset_hash": meta["dataset_hash"],
        "source": meta.get("source"),
        "n_ok": int(len(ok)),
        "counts": counts,
        "width": _quantiles(ok["width"]),
        "height": _quantiles(ok["height"]),
    }


def _quantiles(series: Any) -> dict[str, float]:
    if len(series) == 0:
        return {"p10": 0.0, "median": 0.0, "p90": 0.0}
    q = series.quantile([0.1, 0.5, 0.9])
    return {"p10": float(q.loc[0.1]), "median": float(q.loc[0.5]), "p90": float(q.loc[0.9])}


def compare_profiles(current: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """What changed from `reference` (production's data) to `current`, with human-readable findings."""
    cur, ref = current["counts"], reference["counts"]
    added = sorted(set(cur) - set(ref))
    removed = sorted(set(ref) - set(cur))
    n_cur, n_ref = max(sum(cur.values()), 1), max(sum(ref.values()), 1)
    labels = sorted(set(cur) | set(ref))
    tvd = 0.5 * sum(abs(cur.get(label, 0) / n_cur - ref.get(label, 0) / n_ref) for label in labels)
    changes = {label: {"reference": ref.get(label, 0), "current": cur.get(label, 0)} for label in labels
               if cur.get(label, 0) != ref.get(label, 0)}
    findings: list[str] = []
    if added:
        findings.append(f"new classes since production: {', '.join(added)}")
    if removed:
        findings.append(f"classes gone since production: {', '.join(removed)}")
    if tvd > TVD_WARNING:
        findings.append(f"class distribution moved: total variation distance {tvd:.3f} > {TVD_WARNING}")
    for dim in ("width", "height"):
        before, after = reference[dim]["median"], current[dim]["median"]
        if before and abs(after - before) / before > SIZE_CHANGE_WARNING:
            findings.append(f"median image {dim} changed from {before:.0f} to {after:.0f} px")
    return {
        "reference_dataset": reference.get("dataset_hash"),
        "current_dataset": current.get("dataset_hash"),
        "images": {"reference": reference.get("n_ok"), "current": current.get("n_ok")},
        "added_classes": added,
        "removed_classes": removed,
        "label_set_changed": bool(added or removed),
        "class_distribution_tvd": round(tvd, 4),
        "count_changes": changes,
        "median_size": {"reference": [reference["width"]["median"], reference["height"]["median"]],
                        "current": [current["width"]["median"], current["height"]["median"]]},
        "findings": findings,
    }
