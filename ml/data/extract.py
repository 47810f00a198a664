"""Extracting zip archives from the internet without trusting them.

Every entry name is checked before anything is written (absolute paths, ``..``, drive letters,
backslashes, links and special files are refused), declared sizes and compression ratios are
checked up front, and the real bytes are counted again while streaming, so a header that lies
about sizes cannot smuggle a bomb through. Extraction goes to a temporary folder beside the
destination, renamed into place only when every entry succeeded: a failure publishes nothing.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import time
import uuid
import zipfile
from pathlib import Path, PurePosixPath

from ml.errors import DataError, UnsafeArchiveError

log = logging.getLogger(__name__)

DEFAULT_MAX_TOTAL_BYTES = 20 * 1024**3
DEFAULT_MAX_ENTRIES = 500_000
DEFAULT_MAX_RATIO = 200.0
# Compression ratios of small entries say nothing (1 KiB of blank pixels compresses 100x);
# ratio limits apply to entries and archives larger than this many uncompressed bytes.
RATIO_GRACE_BYTES = 1024**2
CHUNK_BYTES = 1024**2
_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_member_path(name: str) -> PurePosixPath:
    """The relative path an entry name stands for, or UnsafeArchiveError naming it."""
    if not name or "\x00" in name:
        raise UnsafeArchiveError(f"archive entry {name!r}: empty name or NUL byte")
    if "\\" in name:
        raise UnsafeArchiveError(
            f"archive entry {name!r}: backslash in name (Windows path trick) is not allowed"
        )
    if name.startswith("/"):
        raise UnsafeArchiveError(f"archive entry {name!r}: absolute path is not allowed")
    if _DRIVE.match(name):
        raise UnsafeArchiveError(f"archive entry {name!r}: drive letter is not allowed")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeArchiveError(f"archive entry {name!r}: '..' would escape the destination")
    if not parts:
        raise UnsafeArchiveError(f"archive entry {name!r}: names no file")
    return PurePosixPath(*parts)


def _entry_kind(info: zipfile.ZipInfo) -> str:
    """'file', 'dir', or a reason the entry type is refused."""
    mode = info.external_attr >> 16
    fmt = stat.S_IFMT(mode)
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if fmt and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "special file (device, fifo or socket)"
    if info.is_dir():
        return "dir"
    return "file"


def _ratio(uncompressed: int, compressed: int) -> float:
    return uncompressed / max(compressed, 1)


def safe_extract_zip(
    archive: Path,
    dest: Path,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> list[Path]:
    """Extract `archive` into `dest` (which must not exist, or be empty), all or nothing.

    Args:
        archive: The zip file.
        dest: Destination folder; created by a rename of the finished temporary folder.
        max_total_bytes: Limit on the sum of uncompressed entry sizes.
        max_entries: Limit on the number of entries.
        max_ratio: Limit on uncompressed/compressed size, per entry and for the whole archive.

    Returns:
        The extracted regular files, under `dest`, in archive order.

    Raises:
        UnsafeArchiveError: naming the entry and the rule it breaks.
        DataError: the file is not a readable zip, or `dest` is not empty.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(
            f"cannot extract {archive} into {dest}: destination exists and is not an empty folder"
        )
    started = time.monotonic()
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{archive} is not a readable zip archive: {exc}") from None
    with zf:
        plan = _plan(
            zf, archive, max_total_bytes=max_total_bytes, max_entries=max_entries, max_ratio=max_ratio
        )
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            written = _extract(zf, plan, tmp, max_total_bytes=max_total_bytes, max_ratio=max_ratio)
            if dest.exists():
                dest.rmdir()  # checked empty above
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    out = [dest.joinpath(*rel.parts) for rel in written]
    seconds = max(time.monotonic() - started, 1e-9)
    megabytes = sum(info.file_size for info, _, kind in plan if kind == "file") / 1e6
    log.info(
        "extracted %d files (%.1f MB) from %s in %.1f s (%.1f MB/s)",
        len(out),
        megabytes,
        archive.name,
        seconds,
        megabytes / seconds,
    )
    return out


def _plan(
    zf: zipfile.ZipFile, archive: Path, *, max_total_bytes: int, max_entries: int, max_ratio: float
) -> list[tuple[zipfile.ZipInfo, PurePosixPath, str]]:
    """Check every entry's name, type and declared sizes before writing anything."""
    infos = zf.infolist()
    if len(infos) > max_entries:
        raise UnsafeArchiveError(
            f"{archive.name}: {len(infos)} entries, more than the limit of {max_entries} "
            f"(first entry past the limit: {infos[max_entries].filename!r})"
        )
    plan = []
    seen: dict[str, str] = {}
    total = 0
    total_compressed = 0
    for info in infos:
        rel = safe_member_path(info.filename)
        kind = _entry_kind(info)
        if kind not in ("file", "dir"):
            raise UnsafeArchiveError(f"archive entry {info.filename!r}: {kind} is not allowed")
        if info.flag_bits & 0x1:
            raise UnsafeArchiveError(f"archive entry {info.filename!r}: encrypted entries are not supported")
        key = str(rel)
        if key in seen and not (kind == "dir" and seen[key] == "dir"):
            raise UnsafeArchiveError(f"archive entry {info.filename!r}: appears twice in the archive")
        seen[key] = kind
        if kind == "file":
            total += info.file_size
            total_compressed += info.compress_size
            if total > max_total_bytes:
                raise UnsafeArchiveError(
                    f"archive entry {info.filename!r}: total uncompressed size reaches {total} bytes, "
                    f"more than the limit of {max_total_bytes}"
                )
            if info.file_size > RATIO_GRACE_BYTES and _ratio(info.file_size, info.compress_size) > max_ratio:
                raise UnsafeArchiveError(
                    f"archive entry {info.filename!r}: compression ratio "
                    f"{_ratio(info.file_size, info.compress_size):.0f} exceeds the limit of {max_ratio:g} "
                    "(zip bomb?)"
                )
        plan.append((info, rel, kind))
    # A file and a folder of the same name cannot both exist: refuse rather than fail half-way.
    files = {k for k, v in seen.items() if v == "file"}
    for key in seen:
        for parent in PurePosixPath(key).parents:
            if str(parent) in files:
                raise UnsafeArchiveError(f"archive entry {key!r}: its parent {str(parent)!r} is a file entry")
    if total > RATIO_GRACE_BYTES and _ratio(total, total_compressed) > max_ratio:
        raise UnsafeArchiveError(
            f"{archive.name}: overall compression ratio {_ratio(total, total_compressed):.0f} "
            f"exceeds the limit of {max_ratio:g} (zip bomb?)"
        )
    return plan


def _extract(
    zf: zipfile.ZipFile,
    plan: list[tuple[zipfile.ZipInfo, PurePosixPath, str]],
    tmp: Path,
    *,
    max_total_bytes: int,
    max_ratio: float,
) -> list[PurePosixPath]:
    root = tmp.resolve()
    written: list[PurePosixPath] = []
    total = 0
    for info, rel, kind in plan:
        target = root.joinpath(*rel.parts)
        # Belt and braces: the name checks above already rule this out.
        if not target.resolve().is_relative_to(root):
            raise UnsafeArchiveError(f"archive entry {info.filename!r}: resolves outside the destination")
        if kind == "dir":
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL|O_NOFOLLOW: never follow or overwrite anything already there.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        count = 0
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                while chunk := src.read(CHUNK_BYTES):
                    count += len(chunk)
                    total += len(chunk)
                    if count > info.file_size:
                        raise UnsafeArchiveError(
                            f"archive entry {info.filename!r}: more data than the {info.file_size} bytes "
                            "its header declares"
                        )
                    if total > max_total_bytes:
                        raise UnsafeArchiveError(
                            f"archive entry {info.filename!r}: total extracted bytes exceed the limit of "
                            f"{max_total_bytes}"
                        )
                    if count > RATIO_GRACE_BYTES and _ratio(count, info.compress_size) > max_ratio:
                        raise UnsafeArchiveError(
                            f"archive entry {info.filename!r}: real compression ratio exceeds the limit of "
                            f"{max_ratio:g} (zip bomb?)"
                        )
                    out.write(chunk)
        except zipfile.BadZipFile as exc:
            # zipfile stops at the declared size, so a lying header surfaces as a CRC mismatch.
            raise UnsafeArchiveError(
                f"archive entry {info.filename!r}: data does not match its header ({exc})"
            ) from None
        except (zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError) as exc:
            raise UnsafeArchiveError(
                f"archive entry {info.filename!r}: cannot be extracted ({exc})"
            ) from None
        if count != info.file_size:
            raise UnsafeArchiveError(
                f"archive entry {info.filename!r}: {count} bytes extracted but the header "
                f"declares {info.file_size}"
            )
        written.append(rel)
    return written
