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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.data.extract import safe_extract_zip, safe_member_path
from ml.errors import SourceError, UnsafeArchiveError

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


def _extract_limits(config: DataConfig) -> dict[str, Any]:
    return {
        "max_total_bytes": config.max_archive_bytes,
        "max_entries": config.max_archive_entries,
        "max_ratio": config.max_compression_ratio,
    }


def expand_archives(folder: Path, config: DataConfig) -> None:
    """Replace every ``x.zip`` under `folder` by its safely extracted content, in place.

    A zip holding one file becomes that file (``labels.csv.zip -> labels.csv``); a zip holding
    one folder named like the zip becomes that folder (``train.zip -> train/``); anything else
    becomes a folder named after the zip's stem.
    """
    for _ in range(MAX_ARCHIVE_DEPTH):
        archives = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() == ".zip")
        if not archives:
            return
        for archive in archives:
            staging = archive.parent / f".{archive.stem}.x-{uuid.uuid4().hex[:8]}"
            safe_extract_zip(archive, staging, **_extract_limits(config))
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


def fetch_s3(store: Any, bucket: str, prefix: str, dest: Path) -> list[Path]:
    """Download every object under `prefix` (or the one .zip object `prefix`) into `dest`."""
    if store is None:
        raise SourceError(f"source s3://{bucket}/{prefix} needs an object store client (store=...)")
    if getattr(store, "bucket", bucket) != bucket:
        store = store.for_bucket(bucket)
    started = time.monotonic()
    if prefix.endswith(".zip"):
        keys, base = [prefix], prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
    else:
        base = f"{prefix}/" if prefix else ""
        keys = [k for k in store.list_keys(base) if not k.endswith("/")]
    if not keys:
        raise SourceError(f"no objects under s3://{bucket}/{base}")
    out = []
    for key in sorted(keys):
        if not key.startswith(base):
            raise SourceError(f"object store returned key {key!r} outside the prefix {base!r}")
        try:
            rel = safe_member_path(key[len(base) :])
        except UnsafeArchiveError as exc:
            raise SourceError(f"refusing object key {key!r}: {exc}") from None
        target = dest.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        store.download_file(key, target)
        out.append(target)
    seconds = max(time.monotonic() - started, 1e-9)
    megabytes = sum(p.stat().st_size for p in out) / 1e6
    log.info(
        "fetched %d objects (%.1f MB) from s3://%s/%s in %.1f s (%.1f MB/s)",
        len(out),
        megabytes,
        bucket,
        base,
        seconds,
        megabytes / seconds,
    )
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
        fetch_s3(store, source.bucket, source.prefix, target)
        expand_archives(target, config)
        return target
    if source.kind == "kaggle":
        from ml.data.kaggle import download

        target = staging / "kaggle"
        download(source.kaggle_ref, target, credentials=kaggle_credentials)
        expand_archives(target, config)
        return target
    raise SourceError(f"unknown source kind {source.kind!r}; known: {KINDS}")  # pragma: no cover
