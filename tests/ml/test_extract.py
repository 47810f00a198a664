from __future__ import annotations

import stat
import struct
import zipfile
from pathlib import Path

import pytest

from ml.data.extract import safe_extract_zip
from ml.errors import DataError, UnsafeArchiveError

LIMITS = {"max_total_bytes": 50 * 1024**2, "max_entries": 100, "max_ratio": 50.0}


def make_zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def link_info(name: str, kind: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix, so external_attr carries st_mode
    info.external_attr = (kind | 0o777) << 16
    return info


def lying_zip(path: Path, name: str, real: bytes, declared: int) -> Path:
    """A zip whose headers claim `declared` uncompressed bytes for an entry of len(real)."""
    make_zip(path, [(name, real)])
    raw = bytearray(path.read_bytes())
    local = raw.index(b"PK\x03\x04")
    struct.pack_into("<I", raw, local + 22, declared)
    central = raw.index(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, declared)
    path.write_bytes(bytes(raw))
    return path


def assert_nothing_published(tmp_path: Path, archive: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]


def test_good_zip_extracts_all_files(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "ok.zip", [("a/", b""), ("a/x.jpg", b"x" * 10), ("./b/c/y.txt", b"yy")])

    out = safe_extract_zip(archive, tmp_path / "out", **LIMITS)

    assert out == [tmp_path / "out" / "a" / "x.jpg", tmp_path / "out" / "b" / "c" / "y.txt"]
    assert (tmp_path / "out" / "a" / "x.jpg").read_bytes() == b"x" * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.zip", "out"]


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("../evil.txt", "escape"),
        ("a/../../evil.txt", "escape"),
        ("/etc/evil.txt", "absolute"),
        ("C:/evil.txt", "drive letter"),
        ("a\\..\\..\\evil.txt", "backslash"),
        (link_info("link", stat.S_IFLNK), "symbolic link"),
        (link_info("fifo", stat.S_IFIFO), "special file"),
    ],
)
def test_unsafe_entries_are_rejected_by_name(
    tmp_path: Path, entry: str | zipfile.ZipInfo, reason: str
) -> None:
    archive = make_zip(tmp_path / "bad.zip", [("fine.txt", b"ok"), (entry, b"/etc/passwd")])
    name = entry if isinstance(entry, str) else entry.filename

    with pytest.raises(UnsafeArchiveError, match=reason) as err:
        safe_extract_zip(archive, tmp_path / "out", **LIMITS)

    assert repr(name) in str(err.value)
    assert_nothing_published(tmp_path, archive)


def test_bomb_ratio_is_rejected(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "bomb.zip", [("zeros.bin", bytes(4 * 1024**2))])

    with pytest.raises(UnsafeArchiveError, match=r"'zeros.bin'.*compression ratio"):
        safe_extract_zip(archive, tmp_path / "out", **LIMITS)

    assert_nothing_published(tmp_path, archive)


def test_lying_header_is_rejected_while_streaming(tmp_path: Path) -> None:
    # 4 MiB of zeros declared as 1000 bytes: the declared ratio looks harmless.
    archive = lying_zip(tmp_path / "liar.zip", "liar.bin", bytes(4 * 1024**2), declared=1000)

    with pytest.raises(UnsafeArchiveError, match=r"'liar.bin'.*header"):
        safe_extract_zip(archive, tmp_path / "out", **LIMITS)

    assert_nothing_published(tmp_path, archive)


def test_too_many_entries_is_rejected(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "many.zip", [(f"f{i}.txt", b"x") for i in range(6)])

    with pytest.raises(UnsafeArchiveError, match=r"6 entries.*limit of 5.*'f5.txt'"):
        safe_extract_zip(archive, tmp_path / "out", **{**LIMITS, "max_entries": 5})

    assert_nothing_published(tmp_path, archive)


def test_total_size_limit_is_rejected(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "big.zip", [("a.bin", b"a" * 600), ("b.bin", b"b" * 600)])

    with pytest.raises(UnsafeArchiveError, match=r"'b.bin'.*1200 bytes.*limit of 1000"):
        safe_extract_zip(archive, tmp_path / "out", **{**LIMITS, "max_total_bytes": 1000})

    assert_nothing_published(tmp_path, archive)


def test_duplicate_entry_names_are_rejected(tmp_path: Path) -> None:
    with pytest.warns(UserWarning):  # zipfile itself warns about the duplicate
        archive = make_zip(tmp_path / "dup.zip", [("x.txt", b"1"), ("x.txt", b"2")])

    with pytest.raises(UnsafeArchiveError, match="'x.txt'.*twice"):
        safe_extract_zip(archive, tmp_path / "out", **LIMITS)


def test_not_a_zip_and_non_empty_dest_are_data_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip")
    good = make_zip(tmp_path / "good.zip", [("x.txt", b"1")])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep")

    with pytest.raises(DataError, match="not a readable zip"):
        safe_extract_zip(junk, tmp_path / "out", **LIMITS)
    with pytest.raises(DataError, match="not an empty folder"):
        safe_extract_zip(good, tmp_path / "full", **LIMITS)
    assert (tmp_path / "full" / "keep.txt").read_text() == "keep"
