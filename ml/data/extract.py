"""Extracting zip archives from the internet without trusting them.

The central directory is counted before `zipfile` builds one object per entry, so an archive
with millions of entries is refused in bounded memory. Every entry name is checked before
anything is written (absolute paths, ``..``, drive letters, backslashes, control characters,
over-long or over-deep names, links and special files are refused; length is checked first, so
a 16,000-folder-deep name costs nothing), declared sizes and compression ratios are checked up
front, and the real bytes are counted again while streaming, so a header that lies about sizes
cannot smuggle a bomb through. Extraction goes to a temporary folder beside the destination,
renamed into place only when every entry succeeded: a failure publishes nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
import struct
import time
import unicodedata
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
# Name limits, in UTF-8 bytes. 255 is NAME_MAX of ext4, xfs, btrfs and APFS: a longer component
# cannot be created (ENAMETOOLONG). 1,024 for the whole name leaves 3,000 of Linux's 4,096-byte
# PATH_MAX for the work folder in front of it (real datasets: ~50-byte names, 2-4 levels deep).
DEFAULT_MAX_NAME_BYTES = 1024
DEFAULT_MAX_NAME_DEPTH = 32
DEFAULT_MAX_NAME_PART_BYTES = 255
# Messages show at most this many characters of a hostile name.
SHOWN_NAME_CHARS = 80
# The central directory is read into memory by zipfile (and copied into one object per entry):
# cap it at 512 bytes per allowed entry (a 46-byte record + name + extra fields; Kaggle's
# dog-breed zip averages ~110), 256 MB for the default 500,000 entries.
CENTRAL_DIRECTORY_BYTES_PER_ENTRY = 512
CENTRAL_DIRECTORY_MIN_BYTES = 16 * 1024**2
_CENTRAL_RECORD = 46
# Creating an entry fails with these for a name the destination filesystem cannot hold (too
# long, not UTF-8, or equal to another after case folding): the archive's fault, not retryable.
_NAME_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EEXIST, errno.EILSEQ, errno.EINVAL, errno.ENOTDIR})
_DRIVE = re.compile(r"^[A-Za-z]:")
# C0/C1 controls (NUL, newline, escape...) and the bidirectional overrides that make a name
# display differently from what it is (CVE-2021-42574, "Trojan Source").
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def log_transfer(
    logger: logging.Logger, verb: str, count: int, noun: str, n_bytes: int, where: str, started: float
) -> None:
    """One line per fetch or extraction: ``"<verb> <count> <noun> (x MB) <where> in s (MB/s)"``.

    Shared by extraction, the s3 fetch and the Kaggle download; `started` is a `time.monotonic()`.
    """
    seconds = max(time.monotonic() - started, 1e-9)
    megabytes = n_bytes / 1e6
    logger.info(
        "%s %d %s (%.1f MB) %s in %.1f s (%.1f MB/s)", verb, count, noun, megabytes, where, seconds, megabytes / seconds
    )


def shown_name(name: str) -> str:
    """`name` for a message: repr()'d, and cut to SHOWN_NAME_CHARS with its full length when longer."""
    if len(name) <= SHOWN_NAME_CHARS:
        return repr(name)
    return f"{name[:SHOWN_NAME_CHARS]!r}... ({len(name)} characters)"


def check_name(
    name: str,
    *,
    what: str = "archive entry",
    max_bytes: int = DEFAULT_MAX_NAME_BYTES,
    max_depth: int = DEFAULT_MAX_NAME_DEPTH,
    max_part_bytes: int = DEFAULT_MAX_NAME_PART_BYTES,
) -> list[str]:
    """The path components of a relative name, or UnsafeArchiveError naming it and the rule.

    Cheap checks (length, characters) run before anything that grows with the depth.
    """
    if not name:
        raise UnsafeArchiveError(f"{what} {name!r}: empty name")
    if len(name) > max_bytes:  # every character is at least one byte: no need to encode a huge name
        raise UnsafeArchiveError(
            f"{what} {shown_name(name)}: name is longer than the limit of {max_bytes} bytes"
        )
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise UnsafeArchiveError(f"{what} {shown_name(name)}: name is not valid UTF-8") from None
    if size > max_bytes:
        raise UnsafeArchiveError(
            f"{what} {shown_name(name)}: name is {size} bytes (UTF-8), more than the limit of {max_bytes}"
        )
    control = CONTROL_CHARACTERS.search(name)
    if control:
        kind = "NUL byte" if control.group() == "\x00" else f"control character U+{ord(control.group()):04X}"
        raise UnsafeArchiveError(f"{what} {shown_name(name)}: {kind} in name is not allowed")
    if "\\" in name:
        raise UnsafeArchiveError(
            f"{what} {shown_name(name)}: backslash in name (Windows path trick) is not allowed"
        )
    if name.startswith("/"):
        raise UnsafeArchiveError(f"{what} {shown_name(name)}: absolute path is not allowed")
    if _DRIVE.match(name):
        raise UnsafeArchiveError(f"{what} {shown_name(name)}: drive letter is not allowed")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeArchiveError(f"{what} {shown_name(name)}: '..' would escape the destination")
    if not parts:
        raise UnsafeArchiveError(f"{what} {shown_name(name)}: names no file")
    if len(parts) > max_depth:
        raise UnsafeArchiveError(
            f"{what} {shown_name(name)}: {len(parts)} levels deep, more than the limit of {max_depth}"
        )
    for part in parts:
        part_bytes = len(part.encode("utf-8"))
        if part_bytes > max_part_bytes:
            raise UnsafeArchiveError(
                f"{what} {shown_name(name)}: component {shown_name(part)} is {part_bytes} bytes (UTF-8), "
                f"more than the limit of {max_part_bytes}"
            )
    return parts


def safe_member_path(name: str, *, what: str = "archive entry", **limits: int) -> PurePosixPath:
    """The relative path an entry name stands for, or UnsafeArchiveError naming it.

    `limits` are `check_name`'s ``max_bytes``, ``max_depth`` and ``max_part_bytes`` (same defaults).
    """
    return PurePosixPath(*check_name(name, what=what, **limits))


class NameTree:
    """The relative paths planned for one destination, refusing any two that cannot both exist.

    Two names for one path (``a//b`` and ``a/b``, or "café" typed two ways: NFC-equal names are one
    file on macOS and one label to a reader), and a file where a folder must go.
    """

    def __init__(self, what: str = "archive entry", where: str = "in the archive") -> None:
        self.what, self.where = what, where
        self.kinds: dict[str, str] = {}
        self._spelling: dict[str, str] = {}

    def add(self, name: str, rel: PurePosixPath, kind: str) -> None:
        """Record `rel` ("file" or "dir"), named `name` in the source; UnsafeArchiveError on a clash."""
        key = unicodedata.normalize("NFC", str(rel))
        if key in self.kinds and not (kind == "dir" and self.kinds[key] == "dir"):
            raise UnsafeArchiveError(
                f"{self.what} {shown_name(name)}: appears twice {self.where}"
                + ("" if self._spelling[key] == str(rel) else " (the same name after Unicode NFC normalisation)")
            )
        self.kinds[key] = kind
        self._spelling.setdefault(key, str(rel))

    def check_parents(self) -> None:
        """UnsafeArchiveError when a path's parent folder is a file entry.

        String prefixes, not PurePosixPath.parents: linear in the (capped) name length per entry.
        """
        files = {k for k, v in self.kinds.items() if v == "file"}
        for key in self.kinds:
            cut = key.find("/")
            while cut != -1:
                if key[:cut] in files:
                    raise UnsafeArchiveError(
                        f"{self.what} {shown_name(key)}: its parent {shown_name(key[:cut])} is a file entry"
                    )
                cut = key.find("/", cut + 1)


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
    max_name_bytes: int = DEFAULT_MAX_NAME_BYTES,
    max_name_depth: int = DEFAULT_MAX_NAME_DEPTH,
    max_name_part_bytes: int = DEFAULT_MAX_NAME_PART_BYTES,
) -> list[Path]:
    """Extract `archive` into `dest` (which must not exist, or be empty), all or nothing.

    Args:
        archive: The zip file.
        dest: Destination folder; created by a rename of the finished temporary folder.
        max_total_bytes: Limit on the sum of uncompressed entry sizes.
        max_entries: Limit on the number of entries.
        max_ratio: Limit on uncompressed/compressed size, per entry and for the whole archive.
        max_name_bytes: Limit on an entry name's length (UTF-8 bytes).
        max_name_depth: Limit on the number of path components of an entry name.
        max_name_part_bytes: Limit on one path component's length (UTF-8 bytes).

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
    _count_central_directory(archive, max_entries)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, NotImplementedError) as exc:
        raise DataError(f"{archive} is not a readable zip archive: {exc}") from None
    except UnicodeDecodeError as exc:
        raise UnsafeArchiveError(
            f"{archive.name}: an entry name is flagged UTF-8 but is not valid UTF-8 ({exc.reason} at byte "
            f"{exc.start})"
        ) from None
    names = {"max_bytes": max_name_bytes, "max_depth": max_name_depth, "max_part_bytes": max_name_part_bytes}
    with zf:
        plan = _plan(
            zf,
            archive,
            max_total_bytes=max_total_bytes,
            max_entries=max_entries,
            max_ratio=max_ratio,
            names=names,
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
    n_bytes = sum(info.file_size for info, _, kind in plan if kind == "file")
    log_transfer(log, "extracted", len(out), "files", n_bytes, f"from {archive.name}", started)
    return out


def _count_central_directory(archive: Path, max_entries: int) -> None:
    """Refuse too many entries, or an oversized central directory, from the raw records.

    zipfile builds a ZipInfo (~500 bytes) per record before anyone can count them, so 5 M
    records of a 250 MB archive would cost ~2.5 GB first. The declared count may lie; the
    records themselves are counted here, in one bounded read. Anything malformed is left for
    zipfile to report.
    """
    try:
        with open(archive, "rb") as fh:
            # zipfile's own end-of-central-directory reader (handles zip64 and archive comments).
            endrec = zipfile._EndRecData(fh)  # type: ignore[attr-defined]
            if not endrec:
                return
            size_cd = endrec[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
            declared = int(endrec[zipfile._ECD_ENTRIES_TOTAL])  # type: ignore[attr-defined]
            cap = max(CENTRAL_DIRECTORY_MIN_BYTES, max_entries * CENTRAL_DIRECTORY_BYTES_PER_ENTRY)
            if size_cd > cap:
                raise UnsafeArchiveError(
                    f"{archive.name}: central directory of {size_cd} bytes, more than the limit of {cap} "
                    f"({CENTRAL_DIRECTORY_BYTES_PER_ENTRY} bytes per allowed entry)"
                )
            start = endrec[zipfile._ECD_LOCATION] - size_cd  # type: ignore[attr-defined]
            if endrec[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
                start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
            if start < 0:
                return
            fh.seek(start)
            data = fh.read(size_cd)
    except OSError:
        return
    pos, count = 0, 0
    while pos + _CENTRAL_RECORD <= len(data) and data[pos : pos + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        count += 1
        if count > max_entries:
            name = data[pos + _CENTRAL_RECORD : pos + _CENTRAL_RECORD + name_len].decode("utf-8", "replace")
            # The declared count may be a lie in either direction; the records are what zipfile would load.
            how_many = f"{declared}" if declared > max_entries else f"at least {count}"
            raise UnsafeArchiveError(
                f"{archive.name}: {how_many} entries, more than the limit of {max_entries} "
                f"(data.max_archive_entries; first entry past the limit: {shown_name(name)})"
            )
        pos += _CENTRAL_RECORD + name_len + extra_len + comment_len


def _plan(
    zf: zipfile.ZipFile,
    archive: Path,
    *,
    max_total_bytes: int,
    max_entries: int,
    max_ratio: float,
    names: dict[str, int],
) -> list[tuple[zipfile.ZipInfo, PurePosixPath, str]]:
    """Check every entry's name, type and declared sizes before writing anything."""
    infos = zf.infolist()
    if len(infos) > max_entries:
        raise UnsafeArchiveError(
            f"{archive.name}: {len(infos)} entries, more than the limit of {max_entries} "
            f"(first entry past the limit: {shown_name(infos[max_entries].filename)})"
        )
    plan = []
    tree = NameTree()
    total = 0
    total_compressed = 0
    for info in infos:
        # zipfile cuts a name at its first NUL ("a.jpg\0../x" reads as "a.jpg"): judge the raw name.
        raw = getattr(info, "orig_filename", info.filename)
        if "\x00" in raw:
            check_name(raw, **names)
        rel = safe_member_path(info.filename, **names)
        kind = _entry_kind(info)
        if kind not in ("file", "dir"):
            raise UnsafeArchiveError(f"archive entry {shown_name(info.filename)}: {kind} is not allowed")
        if info.flag_bits & 0x1:
            raise UnsafeArchiveError(
                f"archive entry {shown_name(info.filename)}: encrypted entries are not supported"
            )
        tree.add(info.filename, rel, kind)
        if kind == "file":
            total += info.file_size
            total_compressed += info.compress_size
            if total > max_total_bytes:
                raise UnsafeArchiveError(
                    f"archive entry {shown_name(info.filename)}: total uncompressed size reaches {total} bytes, "
                    f"more than the limit of {max_total_bytes}"
                )
            if info.file_size > RATIO_GRACE_BYTES and _ratio(info.file_size, info.compress_size) > max_ratio:
                raise UnsafeArchiveError(
                    f"archive entry {shown_name(info.filename)}: compression ratio "
                    f"{_ratio(info.file_size, info.compress_size):.0f} exceeds the limit of {max_ratio:g} "
                    "(zip bomb?)"
                )
        plan.append((info, rel, kind))
    # A file and a folder of the same name cannot both exist: refuse rather than fail half-way.
    tree.check_parents()
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
            raise UnsafeArchiveError(
                f"archive entry {shown_name(info.filename)}: resolves outside the destination"
            )
        try:
            if kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL|O_NOFOLLOW: never follow or overwrite anything already there.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            if exc.errno not in _NAME_ERRNOS:
                raise  # ENOSPC, EIO...: the disk, not the archive (ingest names the folder)
            raise UnsafeArchiveError(
                f"archive entry {shown_name(info.filename)}: cannot be created under {tmp} "
                f"({errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.strerror}; a name too long for "
                "this filesystem, or one it considers equal to another entry's)"
            ) from None
        count = 0
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                while chunk := src.read(CHUNK_BYTES):
                    count += len(chunk)
                    total += len(chunk)
                    if count > info.file_size:
                        raise UnsafeArchiveError(
                            f"archive entry {shown_name(info.filename)}: more data than the {info.file_size} bytes "
                            "its header declares"
                        )
                    if total > max_total_bytes:
                        raise UnsafeArchiveError(
                            f"archive entry {shown_name(info.filename)}: total extracted bytes exceed the limit of "
                            f"{max_total_bytes}"
                        )
                    if count > RATIO_GRACE_BYTES and _ratio(count, info.compress_size) > max_ratio:
                        raise UnsafeArchiveError(
                            f"archive entry {shown_name(info.filename)}: real compression ratio exceeds the limit of "
                            f"{max_ratio:g} (zip bomb?)"
                        )
                    out.write(chunk)
        except zipfile.BadZipFile as exc:
            # zipfile stops at the declared size, so a lying header surfaces as a CRC mismatch.
            raise UnsafeArchiveError(
                f"archive entry {shown_name(info.filename)}: data does not match its header ({exc})"
            ) from None
        except (zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, UnicodeDecodeError) as exc:
            raise UnsafeArchiveError(
                f"archive entry {shown_name(info.filename)}: cannot be extracted ({exc})"
            ) from None
        if count != info.file_size:
            raise UnsafeArchiveError(
                f"archive entry {shown_name(info.filename)}: {count} bytes extracted but the header "
                f"declares {info.file_size}"
            )
        written.append(rel)
    return written
