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


# --------------------------------------------------------------------------- name and entry limits


def patch_bytes(path: Path, old: bytes, new: bytes) -> Path:
    """Replace every occurrence of `old` (same length) in the raw archive, headers included."""
    raw = path.read_bytes()
    assert len(old) == len(new) and old in raw
    path.write_bytes(raw.replace(old, new))
    return path


@pytest.mark.parametrize(
    ("entry", "rule"),
    [
        ("a/" * 16_000 + "x.jpg", r"\.\.\. \(32005 characters\): name is longer than the limit of 1024 bytes"),
        ("é" * 600 + ".jpg", r"name is 1204 bytes \(UTF-8\), more than the limit of 1024"),
        ("d/" * 40 + "x.jpg", "41 levels deep, more than the limit of 32"),
        ("cats/" + "é" * 150 + ".jpg", r"component .* is 304 bytes \(UTF-8\), more than the limit of 255"),
        ("cats/new\nline.jpg", "control character U\\+000A in name"),
        ("cats/\x1b[31mred.jpg", "control character U\\+001B in name"),
        ("cats/\u202egpj.exe", "control character U\\+202E in name"),
    ],
)
def test_names_over_the_limits_are_refused_naming_entry_and_limit(tmp_path: Path, entry: str, rule: str) -> None:
    archive = make_zip(tmp_path / "names.zip", [("cats/fine.jpg", b"ok"), (entry, b"x")])

    with pytest.raises(UnsafeArchiveError, match=rule) as err:
        safe_extract_zip(archive, tmp_path / "out", **LIMITS)

    assert f"archive entry {entry[:80]!r}" in str(err.value)  # named, and cut when long
    assert len(str(err.value)) < 400
    assert_nothing_published(tmp_path, archive)


def test_name_limits_are_parameters(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "names.zip", [("a/b/c/" + "x" * 20 + ".jpg", b"x")])
    kwargs = {"max_name_bytes": 1024, "max_name_depth": 32, "max_name_part_bytes": 255}

    for key, value, rule in [
        ("max_name_bytes", 20, "longer than the limit of 20 bytes"),
        ("max_name_depth", 3, "4 levels deep, more than the limit of 3"),
        ("max_name_part_bytes", 10, "is 24 bytes .* more than the limit of 10"),
    ]:
        with pytest.raises(UnsafeArchiveError, match=rule):
            safe_extract_zip(archive, tmp_path / "out", **LIMITS, **{**kwargs, key: value})
    assert safe_extract_zip(archive, tmp_path / "out", **LIMITS, **kwargs)


def test_nul_in_the_raw_name_is_refused(tmp_path: Path) -> None:
    # zipfile cuts names at NUL, so "a.jpgX../../x" with X = NUL would read as "a.jpg".
    archive = patch_bytes(
        make_zip(tmp_path / "nul.zip", [("cats/a.jpgX../../x", b"x")]), b"a.jpgX", b"a.jpg\x00"
    )

    with pytest.raises(UnsafeArchiveError, match="NUL byte in name"):
        safe_extract_zip(archive, tmp_path / "out", **LIMITS)
    assert_nothing_published(tmp_path, archive)


def test_name_flagged_utf8_but_invalid_is_unsafe_not_a_traceback(tmp_path: Path) -> None:
    archive = patch_bytes(make_zip(tmp_path / "bad.zip", [("cats/é.jpg", b"x")]), "é".encode(), b"\xff\xfe")

    with pytest.raises(UnsafeArchiveError, match="bad.zip: an entry name is flagged UTF-8 but is not valid UTF-8"):
        safe_extract_zip(archive, tmp_path / "out", **LIMITS)


def test_names_equal_after_nfc_are_one_file(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "nfc.zip", [("caf\u00e9/1.jpg", b"1"), ("cafe\u0301/1.jpg", b"2")])

    with pytest.raises(UnsafeArchiveError, match="appears twice in the archive .*NFC normalisation"):
        safe_extract_zip(archive, tmp_path / "out", **LIMITS)


def test_entry_count_is_checked_before_zipfile_loads_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = make_zip(tmp_path / "many.zip", [(f"f{i}.txt", b"x") for i in range(6)])
    monkeypatch.setattr(zipfile, "ZipFile", lambda *a, **k: pytest.fail("zipfile loaded the directory"))

    with pytest.raises(UnsafeArchiveError, match=r"6 entries, more than the limit of 5.*'f5.txt'"):
        safe_extract_zip(archive, tmp_path / "out", **{**LIMITS, "max_entries": 5})


def test_a_lying_entry_count_does_not_hide_entries(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "liar.zip", [(f"f{i}.txt", b"x") for i in range(6)])
    raw = bytearray(archive.read_bytes())
    end = raw.rindex(b"PK\x05\x06")
    struct.pack_into("<HH", raw, end + 8, 1, 1)  # entries on this disk, entries in all
    archive.write_bytes(bytes(raw))

    with pytest.raises(UnsafeArchiveError, match=r"at least 6 entries, more than the limit of 5.*'f5.txt'"):
        safe_extract_zip(archive, tmp_path / "out", **{**LIMITS, "max_entries": 5})


def test_oversized_central_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ml.data import extract

    monkeypatch.setattr(extract, "CENTRAL_DIRECTORY_MIN_BYTES", 0)
    names = [f"{'a' * 250}/{'b' * 250}/{'c' * 250}/{i}.jpg" for i in range(3)]  # ~800 bytes per record
    archive = make_zip(tmp_path / "fat.zip", [(n, b"x") for n in names])

    with pytest.raises(UnsafeArchiveError, match=r"central directory of \d+ bytes, more than the limit of 1536"):
        safe_extract_zip(archive, tmp_path / "out", **{**LIMITS, "max_entries": 3})


def test_a_name_too_long_for_the_destination_is_unsafe_not_oserror(tmp_path: Path) -> None:
    deep = tmp_path
    while len(str(deep)) < 3300:
        deep = deep / ("p" * 200)
    deep.mkdir(parents=True)
    entry = "/".join(["n" * 200] * 4) + "/x.jpg"  # 810 bytes: within the name limits, not within PATH_MAX here
    archive = make_zip(tmp_path / "long.zip", [(entry, b"x")])

    with pytest.raises(UnsafeArchiveError, match=r"cannot be created under .*ENAMETOOLONG") as err:
        safe_extract_zip(archive, deep / "out", **LIMITS)

    assert repr(entry[:80]) in str(err.value)
    assert sorted(p.name for p in deep.iterdir()) == []  # the temporary folder is gone too
