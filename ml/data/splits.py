"""Train/val/test assignment that is stable as data grows (TensorFlow retrain.py's rule).

An image's split is a function of (seed, its sha256) only: a number in [0, 100) compared with
the val and test percentages. Adding images never moves existing ones, renaming or reordering
changes nothing, and identical bytes always land together. Two corrections follow, both
deterministic: near-duplicate images (pHash) share the split of their group's first member so
they cannot leak between train and test, and each class with >= 3 ok images is topped up so
it has at least one image in train, val (when val_percent > 0) and test.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

from ml.data.manifest import OK
from ml.data.near_duplicates import near_duplicate_groups

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MIN_FOR_TOP_UP = 3


def split_percentage(sha256: str, seed: int) -> float:
    """Where an image falls in [0, 100), from (seed, content hash) alone."""
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100.0


def _split_of(pct: float, val_percent: float, test_percent: float) -> str:
    if pct < val_percent:
        return "val"
    if pct < val_percent + test_percent:
        return "test"
    return "train"


def _intervals(val_percent: float, test_percent: float) -> dict[str, tuple[float, float]]:
    return {
        "val": (0.0, val_percent),
        "test": (val_percent, val_percent + test_percent),
        "train": (val_percent + test_percent, 100.0),
    }


def _distance(pct: float, interval: tuple[float, float]) -> float:
    lo, hi = interval
    return lo - pct if pct < lo else max(pct - hi, 0.0)


def assign_splits(
    manifest: pd.DataFrame, *, val_percent: float, test_percent: float, seed: int
) -> pd.DataFrame:
    """Return a copy of `manifest` with the `split` column filled ("" for quarantined rows).

    Args:
        manifest: From `ml.data.manifest.build_manifest`.
        val_percent: Share of images for validation, in [0, 100).
        test_percent: Share for the test split, in (0, 100).
        seed: Changing it reshuffles every image.
    """
    out = manifest.copy()
    n = len(out)
    status = out["status"].to_numpy()
    shas = out["sha256"].to_numpy()
    labels = out["label"].to_numpy()
    ok = [i for i in range(n) if status[i] == OK]
    pct = {i: split_percentage(shas[i], seed) for i in ok}
    split = {i: _split_of(pct[i], val_percent, test_percent) for i in ok}

    # Leakage guard: a near-duplicate group follows the member with the smallest sha256, so the
    # choice does not depend on row order or file names.
    grouped: set[int] = set()
    for members in near_duplicate_groups(out).members():
        rows = members.tolist()
        leader = min(rows, key=lambda i: shas[i])
        for i in rows:
            split[i] = split[leader]
        grouped.update(rows)

    wanted = [s for s in SPLITS if s != "val" or val_percent > 0]
    intervals = _intervals(val_percent, test_percent)
    moved = 0
    by_class: dict[str, list[int]] = {}
    for i in ok:
        by_class.setdefault(labels[i], []).append(i)
    for label in sorted(by_class):
        rows = by_class[label]
        if len(rows) < MIN_FOR_TOP_UP:
            continue
        for target in wanted:
            if any(split[i] == target for i in rows):
                continue
            # Take from the fullest split (train on ties) the image nearest the target's interval;
            # group members stay put so the leakage guard holds.
            counts = {s: sum(split[i] == s for i in rows) for s in SPLITS}
            donors = sorted(
                (s for s in SPLITS if counts[s] >= 2), key=lambda s: (-counts[s], SPLITS.index(s))
            )
            for donor in donors:
                candidates = [i for i in rows if split[i] == donor and i not in grouped]
                if candidates:
                    pick = min(candidates, key=lambda i: (_distance(pct[i], intervals[target]), shas[i]))
                    split[pick] = target
                    moved += 1
                    break
            else:
                log.warning(
                    "class %r: cannot give %s an image without splitting near-duplicates", label, target
                )
    out["split"] = [split.get(i, "") for i in range(n)]
    counts = split_counts(out)
    log.info(
        "splits: train %d, val %d, test %d (%d moved to cover every class, %d near-duplicate images grouped)",
        counts["train"],
        counts["val"],
        counts["test"],
        moved,
        len(grouped),
    )
    return out


def split_counts(manifest: pd.DataFrame, *, by_label: bool = False) -> dict:
    """Ok images per split: ``{"train": n, "val": n, "test": n}``, or per label
    ``{label: {"train": n, "val": n, "test": n}}`` when `by_label`."""
    ok = manifest[(manifest["status"] == OK) & (manifest["split"].isin(SPLITS))]
    if not by_label:
        counts = ok["split"].value_counts()
        return {s: int(counts.get(s, 0)) for s in SPLITS}
    out: dict[str, dict[str, int]] = {}
    for label, group in ok.groupby("label", sort=True):
        counts = group["split"].value_counts()
        out[str(label)] = {s: int(counts.get(s, 0)) for s in SPLITS}
    return out
