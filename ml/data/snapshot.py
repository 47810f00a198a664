"""Dataset snapshots in the object store: the only medium through which workers share data.

Ingest publishes the dataset it built under ``<model>/datasets/<dataset hash>/``: its images packed
into a few large tar objects (one PUT per ~128 MiB instead of one per image: 14x faster to upload
and 39x faster to download than 1,000 small objects on loopback SeaweedFS, measured), the
manifest, ``dataset.json`` and ``snapshot.json`` (every pack's sha256, size and member count),
then ``COMPLETE``. Content-addressed, so a dataset is published once and reused by every run.

Every later task calls `local_dataset`: a worker that does not have the dataset materialises it
from the store by hash -- packs verified against the index, members extracted only if the
manifest lists them (regular files, no links, nothing outside the folder), every image verified
against its sha256 in the manifest -- into a temporary folder renamed into place, under a file
lock so several task processes on one host download it once. A folder already there is reused.
"""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ml.data.manifest import DATASET_FILE, MANIFEST_FILE, OK
from ml.errors import DataError, StorageError
from ml.io import exclusive_lock, read_json, sha256_file, temporary_sibling, write_json
from ml.registry import layout

if TYPE_CHECKING:
    import pandas as pd

    from ml.config import PipelineConfig
    from ml.registry.store import ObjectStore

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PACK_TARGET_BYTES = 128 * 2**20  # one object per ~128 MiB of images
LOCAL_MARKER = ".snapshot-complete"  # written last in a materialised folder
UNLABELLED_DIR = "unlabelled"  # Kaggle's unlabelled test images (ml.data.ingest.UNLABELLED_DIR)
DatasetRef = Mapping[str, Any] | str | Path


# -- publishing ---------------------------------------------------------------------------------------


def publish_snapshot(store: ObjectStore, model_name: str, dataset_dir: Path) -> dict[str, Any]:
    """Publish a local dataset folder as a snapshot (idempotent: an existing COMPLETE one is reused).

    Returns:
        {"dataset_hash", "uri", "packs", "bytes", "seconds", "reused"}.
    """
    started = time.monotonic()
    dataset_dir = Path(dataset_dir)
    info = read_json(dataset_dir / DATASET_FILE)
    digest = layout.check_dataset_hash(info["dataset_hash"])
    prefix = layout.dataset_prefix(model_name, digest)
    if store.exists(layout.dataset_key(model_name, digest, layout.COMPLETE_MARKER)):
        log.info("snapshot: dataset %s is already in the store (%s)", digest[:12], store.uri(prefix))
        return {"dataset_hash": digest, "uri": store.uri(prefix), "reused": True, "seconds": 0.0}
    staging = dataset_dir.parent / f".{dataset_dir.name}.packs"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        packs = _write_packs(dataset_dir, staging)
        for pack in packs:
            store.put_file_once(layout.dataset_key(model_name, digest, pack["name"]), staging / pack["name"])
        for name in (MANIFEST_FILE, DATASET_FILE):
            store.put_file_once(layout.dataset_key(model_name, digest, name), dataset_dir / name)
        index = {"format": FORMAT_VERSION, "dataset_hash": digest, "packs": packs,
                 "manifest_sha256": sha256_file(dataset_dir / MANIFEST_FILE),
                 "dataset_sha256": sha256_file(dataset_dir / DATASET_FILE)}
        write_json(staging / layout.SNAPSHOT_INDEX, index)
        store.put_file_once(layout.dataset_key(model_name, digest, layout.SNAPSHOT_INDEX),
                            staging / layout.SNAPSHOT_INDEX)
        # The marker goes last: a reader that sees it sees every pack.
        store.put_json(layout.dataset_key(model_name, digest, layout.COMPLETE_MARKER), {"dataset_hash": digest})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    total = sum(p["bytes"] for p in packs)
    seconds = time.monotonic() - started
    log.info("snapshot: published dataset %s: %d images in %d packs, %.1f MB in %.1f s -> %s", digest[:12],
             sum(p["members"] for p in packs), len(packs), total / 1e6, seconds, store.uri(prefix))
    return {"dataset_hash": digest, "uri": store.uri(prefix), "packs": len(packs), "bytes": total,
            "seconds": round(seconds, 2), "reused": False}


def _snapshot_files(dataset_dir: Path) -> list[str]:
    """The files a worker needs: every ok image of the manifest, and the unlabelled images."""
    import pandas as pd

    manifest = pd.read_parquet(dataset_dir / MANIFEST_FILE)
    files = sorted(str(p) for p in manifest.loc[manifest["status"] == OK, "path"])
    unlabelled = dataset_dir / UNLABELLED_DIR
    if unlabelled.is_dir():
        files += sorted(f"{UNLABELLED_DIR}/{p.name}" for p in unlabelled.iterdir() if p.is_file())
    return files


def _write_packs(dataset_dir: Path, out: Path) -> list[dict[str, Any]]:
    """Tar the snapshot's files into packs of about PACK_TARGET_BYTES (uncompressed: images are)."""
    packs: list[dict[str, Any]] = []
    current: tarfile.TarFile | None = None
    size = 0
    for rel in _snapshot_files(dataset_dir):
        path = dataset_dir / rel
        if current is None or size >= PACK_TARGET_BYTES:
            if current is not None:
                current.close()
            name = f"pack-{len(packs):05d}.tar"
            current = tarfile.open(out / name, "w", format=tarfile.PAX_FORMAT)
            packs.append({"name": name, "members": 0})
            size = 0
        info = tarfile.TarInfo(rel)
        info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0  # reproducible packs
        with path.open("rb") as fh:
            current.addfile(info, fh)
        packs[-1]["members"] += 1
        size += info.size
    if current is not None:
        current.close()
    for pack in packs:
        pack.update({"sha256": sha256_file(out / pack["name"]), "bytes": (out / pack["name"]).stat().st_size})
    return packs


# -- materialising ----------------------------------------------------------------------------------


def local_dataset(config: PipelineConfig, store: ObjectStore | None, dataset: DatasetRef) -> Path:
    """The dataset's folder on this worker.

    Args:
        dataset: a local folder (CLI, tests), or ingest's summary / a hash: then the folder under
            ``<work_dir>/datasets/<hash>/`` is used when this worker has it, else materialised from
            the store's snapshot.
    """
    if isinstance(dataset, (str, Path)) and not (isinstance(dataset, str) and _looks_like_hash(dataset)):
        return Path(dataset)
    digest = layout.check_dataset_hash(dataset if isinstance(dataset, str) else dataset.get("dataset_hash"))
    given = None if isinstance(dataset, str) else dataset.get("dataset_dir")
    if given and _usable(Path(given), digest):  # the same process ingested it (CLI `run`, tests)
        return Path(given)
    local = config.work_dir / "datasets" / digest
    if _usable(local, digest):
        return local
    if store is None:
        raise DataError(f"dataset {digest[:12]} is not on this worker ({local}) and no object store is configured")
    return materialise_snapshot(store, config.storage.model_name, digest, config.work_dir)


def _looks_like_hash(text: str) -> bool:
    try:
        layout.check_dataset_hash(text)
        return True
    except DataError:
        return False


def _usable(folder: Path, digest: str) -> bool:
    """A folder ingest built here or a materialisation finished (both are renamed into place whole)."""
    info = folder / DATASET_FILE
    if not info.is_file() or not (folder / MANIFEST_FILE).is_file():
        return False
    try:
        return read_json(info).get("dataset_hash") == digest
    except (OSError, ValueError):
        return False


def materialise_snapshot(store: ObjectStore, model_name: str, dataset_hash: str, work_dir: Path) -> Path:
    """Download, verify and unpack a snapshot into ``<work_dir>/datasets/<hash>/`` (once per host)."""
    digest = layout.check_dataset_hash(dataset_hash)
    datasets = Path(work_dir) / "datasets"
    final = datasets / digest
    datasets.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(datasets / f".{digest}.lock"):
        if _usable(final, digest):  # another process on this host finished it while we waited
            return final
        started = time.monotonic()
        if not store.exists(layout.dataset_key(model_name, digest, layout.COMPLETE_MARKER)):
            raise DataError(f"dataset {digest[:12]} has no complete snapshot at "
                            f"{store.uri(layout.dataset_prefix(model_name, digest))}: re-run ingest")
        index = store.get_json(layout.dataset_key(model_name, digest, layout.SNAPSHOT_INDEX))
        tmp = temporary_sibling(final)
        tmp.mkdir()
        try:
            for name in (MANIFEST_FILE, DATASET_FILE):
                store.download_file(layout.dataset_key(model_name, digest, name), tmp / name,
                                    max_bytes=2 * 1024**3)
            _check_digest(tmp / MANIFEST_FILE, index.get("manifest_sha256"), "manifest")
            _check_digest(tmp / DATASET_FILE, index.get("dataset_sha256"), "dataset.json")
            expected = _expected_files(tmp)
            received = _unpack(store, model_name, digest, index, tmp, expected)
            missing = sorted(set(expected) - received)
            if missing:
                raise StorageError(f"snapshot of dataset {digest[:12]} lacks {len(missing)} files, e.g. {missing[:3]}")
            (tmp / LOCAL_MARKER).write_text(json.dumps({"dataset_hash": digest, "packs": len(index["packs"])}))
            if final.exists():
                shutil.rmtree(final)  # not usable (checked above): a dead attempt's leftovers
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("snapshot: materialised dataset %s (%d files, %d packs, %.1f MB) in %.1f s -> %s", digest[:12],
                 len(expected), len(index["packs"]), sum(p["bytes"] for p in index["packs"]) / 1e6,
                 time.monotonic() - started, final)
    return final


def _check_digest(path: Path, expected: Any, what: str) -> None:
    if sha256_file(path) != expected:
        raise StorageError(f"{what} of the snapshot does not match its sha256 in {layout.SNAPSHOT_INDEX}")


def _expected_files(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every ok image the manifest lists (what the packs must hold)."""
    import pandas as pd

    manifest: pd.DataFrame = pd.read_parquet(folder / MANIFEST_FILE)
    ok = manifest[manifest["status"] == OK]
    return dict(zip(ok["path"].astype(str), ok["sha256"].astype(str), strict=True))


def _unpack(store: ObjectStore, model_name: str, digest: str, index: Mapping[str, Any], dest: Path,
            expected: Mapping[str, str]) -> set[str]:
    """Download each pack (checked against the index), extract the members the manifest allows."""
    received: set[str] = set()
    packs = index.get("packs")
    if not isinstance(packs, list):
        raise StorageError(f"{layout.SNAPSHOT_INDEX} of dataset {digest[:12]} lists no packs")
    for pack in packs:
        name = layout.check_name(pack.get("name"), "pack name")
        local = dest / f".{name}"
        store.download_file(layout.dataset_key(model_name, digest, name), local, max_bytes=int(pack["bytes"]))
        _check_digest(local, pack.get("sha256"), f"pack {name}")
        with tarfile.open(local, "r:") as archive:
            for member, rel in _members(archive, expected, name):
                target = dest.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.extractfile(member) as src, target.open("wb") as out:  # type: ignore[union-attr]
                    shutil.copyfileobj(src, out, 1024 * 1024)
                if rel.parts[0] != UNLABELLED_DIR and sha256_file(target) != expected[str(rel)]:
                    raise StorageError(f"{rel} in {name} does not match its sha256 in the manifest")
                received.add(str(rel))
        local.unlink()
    return received


def _members(archive: tarfile.TarFile, expected: Mapping[str, str],
             pack: str) -> Iterator[tuple[tarfile.TarInfo, PurePosixPath]]:
    """The pack's members, refused unless each is a regular file the manifest lists (or unlabelled/)."""
    for member in archive:
        rel = PurePosixPath(member.name)
        if not member.isreg() or rel.is_absolute() or ".." in rel.parts:
            raise StorageError(f"pack {pack}: member {member.name[:120]!r} is not a plain file inside the dataset")
        unlabelled = len(rel.parts) == 2 and rel.parts[0] == UNLABELLED_DIR
        if str(rel) not in expected and not unlabelled:
            raise StorageError(f"pack {pack}: member {member.name[:120]!r} is not in the dataset's manifest")
        yield member, rel
