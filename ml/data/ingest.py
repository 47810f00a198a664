"""Ingest: any source -> a content-addressed dataset folder with a manifest and splits.

Everything is built in ``<work_dir>/datasets/.tmp-<random>/`` and renamed to
``<work_dir>/datasets/<dataset_hash>/`` at the end, so a reader never sees half a dataset and
re-ingesting the same content reuses the folder (stage idempotency, DESIGN invariants 1 and 5).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.data.extract import shown_name
from ml.data.layouts import detect_layout, find_dataset_root, find_unlabelled, list_labelled_images
from ml.data.manifest import DATASET_FILE, MANIFEST_FILE, OK, build_manifest, dataset_hash
from ml.data.near_duplicates import near_duplicate_groups
from ml.data.sources import materialise, parse_source
from ml.data.splits import assign_splits, split_counts
from ml.errors import DataError
from ml.io import write_json, write_with

if TYPE_CHECKING:
    from ml.config import DataConfig

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
UNLABELLED_DIR = "unlabelled"
# Kaggle's sample submission (column and row order of a submission) travels with the unlabelled
# images it lists, so snapshots carry it to every worker and promote can write submission.csv.
SAMPLE_SUBMISSION = "sample_submission.csv"
MAX_PROBLEMS_KEPT = 50
# Deterministic filesystem refusals of a name (too long, not representable, a file where a
# folder must be): retrying cannot help, so they surface as DataError.
_NAME_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EILSEQ, errno.ENOTDIR, errno.ELOOP})


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (free on one filesystem), else copy it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
        shutil.copy2(src, dst)


def _split_config(config: DataConfig) -> dict[str, float | int]:
    return {"val_percent": config.val_percent, "test_percent": config.test_percent, "seed": config.seed}


def _write_manifest(path: Path, frame: Any) -> None:
    write_with(path, lambda tmp: frame.to_parquet(tmp, index=False), suffix=".parquet")


def load_dataset(dataset_dir: Path) -> tuple[dict[str, Any], Any]:
    """(dataset.json dict, manifest DataFrame) of a published dataset folder."""
    import pandas as pd

    dataset_dir = Path(dataset_dir)
    meta_path, manifest_path = dataset_dir / DATASET_FILE, dataset_dir / MANIFEST_FILE
    if not meta_path.is_file() or not manifest_path.is_file():
        raise DataError(
            f"{dataset_dir} is not a dataset folder: {DATASET_FILE} or {MANIFEST_FILE} is missing"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return meta, pd.read_parquet(manifest_path)


def ingest(
    source: str,
    work_dir: Path,
    config: DataConfig,
    *,
    store: Any = None,
    kaggle_credentials: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Fetch, check, split and publish a dataset; returns dataset.json plus ``dataset_dir``.

    Args:
        source: A local folder or .zip, ``s3://bucket/prefix``, or ``kaggle:competitions/<slug>`` /
            ``kaggle:datasets/<owner>/<slug>``.
        work_dir: Datasets go to ``<work_dir>/datasets/<dataset_hash>/``.
        config: Layout, split and safety settings.
        store: Object-store client for s3:// sources (``list_keys``, ``download_file``, ``for_bucket``).
        kaggle_credentials: (username, key) for Kaggle sources.
    """
    parsed = parse_source(source)
    datasets = Path(work_dir) / "datasets"
    datasets.mkdir(parents=True, exist_ok=True)
    tmp = datasets / f".tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        return _ingest_into(tmp, datasets, parsed, config, store=store, kaggle_credentials=kaggle_credentials)
    except OSError as exc:
        if exc.errno in _NAME_ERRNOS:
            # The same names fail the same way on every retry: bad input, not a transient fault.
            where = shown_name(str(exc.filename)) if exc.filename else "a file"
            raise DataError(
                f"cannot ingest {parsed.uri}: {where} cannot be created or read under {datasets} "
                f"({errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.strerror}); names must stay within "
                f"data.max_name_bytes={config.max_name_bytes} and {config.max_name_part_bytes} bytes per "
                "component, and the work folder must leave room for them in the 4,096-byte path limit"
            ) from None
        if exc.errno != errno.ENOSPC:
            raise
        # Extraction writes through file objects, whose ENOSPC names no path: say where it ran out.
        raise OSError(
            errno.ENOSPC,
            f"no space left on device while ingesting {parsed.uri} into {datasets} "
            f"({shutil.disk_usage(datasets).free} bytes free; failed at "
            f"{exc.filename or 'an extracted file'}); "
            "nothing was published: free space or point ML_WORK_DIR at a bigger volume",
        ) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_class_count(items: list[tuple[Path, str]], uri: str, config: DataConfig) -> None:
    """DataError before any K x K work (quality suite, confusion matrices) when K is over the cap."""
    labels = {label for _, label in items}
    if len(labels) > config.max_classes:
        examples = ", ".join(shown_name(label) for label in sorted(labels)[:5])
        raise DataError(
            f"{uri} has {len(labels)} classes, more than data.max_classes={config.max_classes} "
            f"(e.g. {examples}); raise data.max_classes if that many is intended"
        )


def _ingest_into(
    tmp: Path,
    datasets: Path,
    parsed: Any,
    config: DataConfig,
    *,
    store: Any,
    kaggle_credentials: tuple[str, str] | None,
) -> dict[str, Any]:
    started = time.monotonic()
    staging = tmp / ".staging"
    raw = materialise(parsed, staging, config, store=store, kaggle_credentials=kaggle_credentials)
    root = find_dataset_root(raw, config)
    layout = detect_layout(root, config)
    items, problems = list_labelled_images(root, config)
    _check_class_count(items, parsed.uri, config)
    unlabelled = find_unlabelled(root, config)

    t0 = time.monotonic()
    images_dir = tmp / IMAGES_DIR
    staged: list[tuple[Path, str]] = []
    for path, label in items:
        dst = images_dir / path.relative_to(root)
        if not dst.exists():  # an id listed with two labels appears twice
            link_or_copy(path, dst)
        staged.append((dst, label))
    for path in unlabelled:
        link_or_copy(path, tmp / UNLABELLED_DIR / path.name)
    sample = root / SAMPLE_SUBMISSION
    keep_sample = bool(unlabelled) and sample.is_file() and not sample.is_symlink()
    if keep_sample:
        link_or_copy(sample, tmp / UNLABELLED_DIR / SAMPLE_SUBMISSION)
    if staging.exists():
        shutil.rmtree(staging)  # hard links keep the data; the raw download is no longer needed
    seconds = max(time.monotonic() - t0, 1e-9)
    log.info(
        "ingest: %d labelled + %d unlabelled files from %s (%s layout, %d problems) staged in %.1f s "
        "(%.0f files/s)",
        len(items),
        len(unlabelled),
        parsed.uri,
        layout,
        len(problems),
        seconds,
        (len(items) + len(unlabelled)) / seconds,
    )
    for problem in problems[:10]:
        log.warning("data problem: %s", problem)
    if len(problems) > 10:
        log.warning("... and %d more data problems (see dataset.json extra.problems)", len(problems) - 10)

    manifest = build_manifest(staged, tmp, max_pixels=config.max_image_pixels, max_bytes=config.max_image_bytes)
    manifest = assign_splits(manifest, **_split_config(config))
    digest = dataset_hash(manifest)
    near = near_duplicate_groups(manifest)
    ok = manifest[manifest["status"] == OK]
    if ok.empty:
        statuses = manifest["status"].value_counts().to_dict()
        raise DataError(f"no usable images in {parsed.uri}: every file was quarantined ({statuses})")

    counts = {str(k): int(v) for k, v in ok["label"].value_counts().sort_index().items()}
    meta: dict[str, Any] = {
        "dataset_hash": digest,
        "source": parsed.uri,
        "layout": layout,
        "labels": sorted(counts),
        "counts": counts,
        "n_images": len(manifest),
        "n_ok": len(ok),
        "n_quarantined": len(manifest) - len(ok),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "extra": {
            "split_config": _split_config(config),
            "splits": split_counts(manifest),
            "status_counts": {str(k): int(v) for k, v in manifest["status"].value_counts().items()},
            "near_duplicate_groups": near.n_groups,
            "near_duplicate_images": near.n_images,
            "n_unlabelled": len(unlabelled),
            "sample_submission": f"{UNLABELLED_DIR}/{SAMPLE_SUBMISSION}" if keep_sample else None,
            "n_problems": len(problems),
            "problems": problems[:MAX_PROBLEMS_KEPT],
        },
    }
    _write_manifest(tmp / MANIFEST_FILE, manifest)
    write_json(tmp / DATASET_FILE, meta)

    final = datasets / digest
    try:
        os.rename(tmp, final)
        log.info(
            "ingest: published dataset %s (%d ok, %d quarantined, splits %s) in %.1f s",
            digest[:12],
            meta["n_ok"],
            meta["n_quarantined"],
            meta["extra"]["splits"],
            time.monotonic() - started,
        )
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.is_dir():
            raise
        meta = _reuse(final, manifest, meta)
    return {**meta, "dataset_dir": str(final)}


def _reuse(final: Path, manifest: Any, fresh_meta: dict[str, Any]) -> dict[str, Any]:
    """The same content is already published: keep it, refreshing splits if their settings changed."""
    existing, _ = load_dataset(final)
    if existing.get("extra", {}).get("split_config") != fresh_meta["extra"]["split_config"]:
        # Images are identical (same hash); only the derived split column differs. Each file is
        # replaced atomically so a reader sees either the old or the new version of each.
        log.warning(
            "ingest: dataset %s exists with split settings %s; rewriting its splits for %s",
            final.name[:12],
            existing.get("extra", {}).get("split_config"),
            fresh_meta["extra"]["split_config"],
        )
        existing_manifest = load_dataset(final)[1]
        by_key = dict(
            zip(zip(manifest["sha256"], manifest["label"], strict=True), manifest["split"], strict=True)
        )
        existing_manifest["split"] = [
            by_key.get((sha, label), "") if status == OK else ""
            for sha, label, status in zip(
                existing_manifest["sha256"],
                existing_manifest["label"],
                existing_manifest["status"],
                strict=True,
            )
        ]
        existing["extra"]["split_config"] = fresh_meta["extra"]["split_config"]
        existing["extra"]["splits"] = split_counts(existing_manifest)
        _write_manifest(final / MANIFEST_FILE, existing_manifest)
        write_json(final / DATASET_FILE, existing)
    log.info("ingest: dataset %s already published at %s; reused", final.name[:12], final)
    return existing
