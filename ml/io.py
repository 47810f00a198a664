"""Local file I/O that never leaves a half-written file where a reader would take it as complete.

Every writer here goes through a temporary name beside the target and an ``os.replace`` (atomic
on POSIX), so a task killed mid-write leaves at most a hidden ``.tmp`` file (DESIGN invariant 1).
Folders are built in a private staging folder and published by rename the same way. Also here:
numpy/Path -> JSON conversion, file digests, the inter-process lock and a pid check, because every
stage needs them and each used to carry its own copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_BLOCK = 1024 * 1024  # 1 MiB reads when hashing


def temporary_sibling(path: Path, suffix: str = "") -> Path:
    """A hidden, unique name beside `path` (same filesystem, so a rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on failure it is removed.

    For writers that want a file name (``np.save``, ``model.save``, ``frame.to_parquet``):
    ``suffix`` keeps the extension some of them insist on (``.npz``, ``.keras``).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target, suffix)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write bytes (or UTF-8 text), flushed to disk, then renamed into place."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def write_json(path: str | Path, obj: Any, *, sort_keys: bool = True) -> Path:
    """`obj` as indented UTF-8 JSON (numpy, Paths and NaN made JSON-safe first), atomically."""
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    return write_atomic(path, text)


def read_json(path: str | Path) -> Any:
    """Parse a UTF-8 JSON file (what `write_json` writes: non-ASCII labels stay readable everywhere)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_npz(path: str | Path, **arrays: Any) -> Path:
    """A compressed .npz of `arrays`, atomically."""
    import numpy as np

    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    return Path(path)


def write_with(path: str | Path, writer: Callable[[Path], Any], *, suffix: str = "") -> Path:
    """Call ``writer(tmp_path)`` and publish what it wrote at `path` atomically."""
    with atomic_path(path, suffix=suffix) as tmp:
        writer(tmp)
    return Path(path)


def to_jsonable(value: Any) -> Any:
    """A copy with numpy scalars/arrays, Paths, tuples and sets made JSON-safe; NaN/inf -> None."""
    import numpy as np

    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks (``md5`` for S3 ETags: not for security)."""
    digest = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")
    with Path(path).open("rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file."""
    return file_digest(path, "sha256")


def fresh_dir(path: str | Path) -> Path:
    """An empty folder: leftovers of a killed attempt are removed, never built upon."""
    folder = Path(path)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


@contextlib.contextmanager
def staging_dir(out_dir: str | Path) -> Iterator[Path]:
    """A private staging folder inside `out_dir`, removed on exit (after publish or on failure).

    Staging folders of dead processes (a SIGKILLed attempt) are removed first.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(".staging-*"):
        pid = old.name.split("-")[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            log.info("removing staging folder %s of a dead attempt", old)
            shutil.rmtree(old, ignore_errors=True)
    staging = out / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """An advisory lock file shared by concurrent builders on one machine (training tasks)."""
    lock = Path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
