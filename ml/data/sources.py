"""Dataset sources: a local folder, a local zip, an S3 prefix or object, or Kaggle.

`parse_source` turns the user's string into a `Source`; `materialise` brings the source's files
into a private staging folder (downloading and safely extracting archives) and returns the
folder to read. Local folders are read in place, never modified.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ml.data.extract import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_TOTAL_BYTES,
    NameTree,
    log_transfer,
    safe_extract_zip,
    safe_member_path,
    shown_name,
)
from ml.errors import SourceError, StorageError, UnsafeArchiveError

if TYPE_CHECKING:
    from ml.config import DataConfig

log = logging.getLogger(__name__)

KINDS = ("local_dir", "local_zip", "s3", "kaggle")
SOURCE_HELP = (
    "a local folder, a local .zip, s3://bucket/prefix (a folder or a .zip object), "
    "kaggle:competitions/<slug> or kaggle:datasets/<owner>/<slug>"
)
# Archives inside archives (Kaggle's old train.zip inside the competition zip) are expanded this deep.
MAX_ARCHIVE_DEPTH = 2


@dataclass(frozen=True)
class Source:
    """A parsed dataset source."""

    kind: str
    uri: str
    path: Path | None = None  # local_dir, local_zip
    bucket: str = ""  # s3
    prefix: str = ""  # s3: key prefix or the key of a .zip object
    kaggle_ref: str = ""  # kaggle: "competitions/<slug>" or "datasets/<owner>/<slug>"


def parse_source(source: str) -> Source:
    """Parse a source string; SourceError says what forms are allowed."""
    text = (source or "").strip()
    if not text:
        raise SourceError(f"no data source given; expected {SOURCE_HELP}")
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://") :].partition("/")
        if not bucket:
            raise SourceError(f"source {text!r} has no bucket; expected s3://bucket/prefix")
        return Source(
            "s3", text, bucket=bucket, prefix=prefix.strip("/") if not prefix.endswith(".zip") else prefix
        )
    if text.startswith("kaggle:"):
        from ml.data.kaggle import parse_kaggle_ref

        return Source("kaggle", text, kaggle_ref=parse_kaggle_ref(text[len("kaggle:") :]))
    if "://" in text:
        raise SourceError(f"unsupported source scheme in {text!r}; expected {SOURCE_HELP}")
    path = Path(text).expanduser()
    if path.is_dir():
        return Source("local_dir", text, path=path)
    if path.is_file() and path.suffix.lower() == ".zip":
        return Source("local_zip", text, path=path)
    if path.exists():
        raise SourceError(f"source {text!r} is a file but not a .zip; expected {SOURCE_HELP}")
    raise SourceError(f"source {text!r} does not exist; expected {SOURCE_HELP}")


def name_limits(config: DataConfig) -> dict[str, int]:
    """The name rules of `ml.data.extract.check_name`, from the config."""
    return {
        "max_bytes": config.max_name_bytes,
        "max_depth": config.max_name_depth,
        "max_part_bytes": config.max_name_part_bytes,
    }


def _extract_limits(config: DataConfig) -> dict[str, Any]:
    return {
        "max_total_bytes": config.max_archive_bytes,
        "max_entries": config.max_archive_entries,
        "max_ratio": config.max_compression_ratio,
        "max_name_bytes": config.max_name_bytes,
        "max_name_depth": config.max_name_depth,
        "max_name_part_bytes": config.max_name_part_bytes,
    }


def expand_archives(folder: Path, config: DataConfig) -> None:
    """Replace every ``x.zip`` under `folder` by its safely extracted content, in place.

    A zip holding one file becomes that file (``labels.csv.zip -> labels.csv``); a zip holding
    one folder named like the zip becomes that folder (``train.zip -> train/``); anything else
    becomes a folder named after the zip's stem.

    The source's byte and entry limits cover everything extracted, nested archives included:
    each inner archive gets only what the files already there leave (else 100 inner zips could
    each unpack the full 20 GiB).
    """
    files = [p for p in folder.rglob("*") if p.is_file()]
    used_bytes, used_entries = sum(p.stat().st_size for p in files), len(files)
    for _ in range(MAX_ARCHIVE_DEPTH):
        archives = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() == ".zip")
        if not archives:
            return
        for archive in archives:
            left_bytes = config.max_archive_bytes - used_bytes
            left_entries = config.max_archive_entries - used_entries
            if left_bytes <= 0 or left_entries <= 0:
                raise UnsafeArchiveError(
                    f"nested archive {archive.relative_to(folder)}: the source already holds {used_bytes} bytes "
                    f"in {used_entries} files, which leaves nothing of data.max_archive_bytes="
                    f"{config.max_archive_bytes} / data.max_archive_entries={config.max_archive_entries}"
                )
            staging = archive.parent / f".{archive.stem}.x-{uuid.uuid4().hex[:8]}"
            limits = {**_extract_limits(config), "max_total_bytes": left_bytes, "max_entries": left_entries}
            extracted = safe_extract_zip(archive, staging, **limits)
            used_bytes += sum(p.stat().st_size for p in extracted) - archive.stat().st_size
            used_entries += len(extracted) - 1
            entries = [p for p in staging.iterdir() if p.name != "__MACOSX"]
            if len(entries) == 1 and (entries[0].is_file() or entries[0].name == archive.stem):
                target, content = archive.parent / entries[0].name, entries[0]
            else:
                target, content = archive.parent / archive.stem, staging
            if target.exists():
                raise SourceError(
                    f"extracting {archive.name} would overwrite {target.name}, which is already there"
                )
            archive.unlink()
            content.rename(target)
            if staging.exists():
                shutil.rmtree(staging)
    leftover = [p.name for p in folder.rglob("*.zip")]
    if leftover:
        log.warning(
            "archives nested deeper than %d levels left as they are: %s", MAX_ARCHIVE_DEPTH, leftover[:5]
        )


def fetch_s3(
    store: Any,
    bucket: str,
    prefix: str,
    dest: Path,
    *,
    max_objects: int = DEFAULT_MAX_ENTRIES,
    max_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    names: dict[str, int] | None = None,
) -> list[Path]:
    """Download every object under `prefix` (or the one .zip object `prefix`) into `dest`.

    The listing is checked before any download, as an archive's directory is: at most
    `max_objects` objects and `max_bytes` bytes in all (counted while listing, so a prefix with
    millions of objects is refused without holding them), every key a safe relative name (see
    `ml.data.extract.check_name`) and no two keys for one path. Each download stops at the size
    the listing gave.

    Raises:
        SourceError: naming the prefix or key and the rule (a DataError: never retried).
    """
    if store is None:
        raise SourceError(f"source s3://{bucket}/{prefix} needs an object store client (store=...)")
    if getattr(store, "bucket", bucket) != bucket:
        store = store.for_bucket(bucket)
    started = time.monotonic()
    if prefix.endswith(".zip"):
        base = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        meta = store.head(prefix)
        listing = iter([{"key": prefix, "size": meta["size"]}] if meta else [])
    else:
        base = f"{prefix}/" if prefix else ""
        listing = store.iter_objects(base)
    where = f"s3://{bucket}/{base}"
    planned: list[tuple[str, PurePosixPath, int]] = []
    tree = NameTree("object", f"under {where} (two keys for one file)")
    total = 0
    for item in listing:
        key, size = str(item["key"]), int(item["size"])
        if key.endswith("/"):
            continue  # a console's "folder" placeholder, not data
        if not key.startswith(base):
            raise SourceError(f"object store returned key {shown_name(key)} outside the prefix {base!r}")
        if len(planned) >= max_objects:
            raise SourceError(
                f"{where} holds more than {max_objects} objects (data.max_archive_entries); refusing before "
                f"downloading any (first object past the limit: {shown_name(key)})"
            )
        total += size
        if total > max_bytes:
            raise SourceError(
                f"{where}: objects listed so far total {total} bytes, more than the limit of {max_bytes} "
                f"(data.max_archive_bytes; reached at {shown_name(key)}); refusing before downloading any"
            )
        try:
            rel = safe_member_path(key[len(base) :], what=f"{where}: object", **(names or {}))
            tree.add(key[len(base) :], rel, "file")
        except UnsafeArchiveError as exc:
            raise SourceError(f"refusing the source: {exc}") from None
        planned.append((key, rel, size))
    if not planned:
        raise SourceError(f"no objects under {where}")
    try:
        tree.check_parents()
    except UnsafeArchiveError as exc:
        raise SourceError(f"refusing the source {where}: {exc}") from None
    out = []
    for key, rel, size in sorted(planned):
        target = dest.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            store.download_file(key, target, max_bytes=size)
        except StorageError:
            now = store.head(key)
            if now is not None and int(now["size"]) != size:
                raise SourceError(
                    f"object {shown_name(key)} in s3://{bucket}/ changed while it was being ingested: listed with "
                    f"{size} bytes, now {now['size']}; refusing (re-run once the source is stable)"
                ) from None
            raise
        out.append(target)
    log_transfer(log, "fetched", len(out), "objects", sum(p.stat().st_size for p in out), f"from {where}", started)
    return out


def materialise(
    source: Source,
    staging: Path,
    config: DataConfig,
    *,
    store: Any = None,
    kaggle_credentials: tuple[str, str] | None = None,
) -> Path:
    """Make the source's files readable on disk; returns the folder holding them.

    Local folders are returned as they are; everything else lands under `staging`.
    """
    if source.kind == "local_dir":
        assert source.path is not None
        return source.path
    staging.mkdir(parents=True, exist_ok=True)
    if source.kind == "local_zip":
        assert source.path is not None
        target = staging / "extracted"
        safe_extract_zip(source.path, target, **_extract_limits(config))
        expand_archives(target, config)
        return target
    if source.kind == "s3":
        target = staging / "s3"
        fetch_s3(
            store,
            source.bucket,
            source.prefix,
            target,
            max_objects=config.max_archive_entries,
            max_bytes=config.max_archive_bytes,
            names=name_limits(config),
        )
        expand_archives(target, config)
        return target
    if source.kind == "kaggle":
        from ml.data.kaggle import download

        target = staging / "kaggle"
        download(source.kaggle_ref, target, credentials=kaggle_credentials)
        expand_archives(target, config)
        return target
    raise SourceError(f"unknown source kind {source.kind!r}; known: {KINDS}")  # pragma: no cover
