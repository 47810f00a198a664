"""Dataset layouts: Kaggle's labels-CSV + image folder, or one folder per class.

`list_labelled_images` never silently drops data: everything it cannot use is described in
the returned list of problems (ids without files, files without ids, conflicting duplicates,
labels that are too long or hold control characters, file names that break the name rules...).
Labels become JSON keys and page text, never file names.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from ml.data.extract import CONTROL_CHARACTERS, check_name, shown_name
from ml.data.sources import name_limits
from ml.errors import DataError, UnsafeArchiveError

if TYPE_CHECKING:
    from ml.config import DataConfig

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
UNLABELLED_DIR = "test"  # Kaggle's unlabelled images
# Archive and OS litter that is never data.
_IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
# csv reads a whole line before anyone can look at it: lines are cut here first. Python's own
# csv field limit is 128 KiB; a labels line is ~50 characters.
MAX_LABELS_LINE_CHARS = 1024**2


def label_problem(label: str, max_chars: int) -> str:
    """Why `label` cannot name a class ("" when it can)."""
    if len(label) > max_chars:
        return f"is {len(label)} characters long, more than data.max_label_chars={max_chars}"
    control = CONTROL_CHARACTERS.search(label)
    if control:
        return f"contains the control character U+{ord(control.group()):04X}"
    try:
        label.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    return ""


def _name_problem(rel: str, config: DataConfig) -> str:
    """Why a file's path (relative to the dataset root) breaks the name rules ("" when it does not)."""
    try:
        check_name(rel, what="file", **name_limits(config))
    except UnsafeArchiveError as exc:
        return f"{exc} (ignored)"
    return ""


def _walk_files(top: Path, max_depth: int, problems: list[str] | None = None) -> Iterator[Path]:
    """Files under `top`, at most `max_depth` folders down, not following folder links.

    Iterative, unlike pathlib's rglob, which recurses once per level (RecursionError ~1,000 deep).
    """
    stack = [(top, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if problems is not None:
                problems.append(f"{shown_name(str(folder.relative_to(top)))}: cannot be listed ({exc.strerror})")
            continue
        for entry in reversed(entries):
            if entry.is_dir(follow_symlinks=False):
                if depth + 1 >= max_depth:
                    if problems is not None:
                        rel = str(Path(entry.path).relative_to(top))
                        problems.append(
                            f"{shown_name(rel)}: more than data.max_name_depth={max_depth} levels deep (ignored)"
                        )
                    continue
                stack.append((Path(entry.path), depth + 1))
            elif entry.is_file():
                yield Path(entry.path)


def _ignored(path: Path) -> bool:
    return path.name.startswith(".") or path.name in _IGNORED_NAMES


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def find_dataset_root(root: Path, config: DataConfig) -> Path:
    """Descend through single wrapping folders (``dataset.zip -> dataset/ -> labels.csv``).

    Stops at the first folder that has a labels file, several entries, or any file.
    """
    root = Path(root)
    for _ in range(8):  # a handful of wrappers at most
        if (root / config.labels_file).is_file():
            return root
        entries = [p for p in root.iterdir() if not _ignored(p)] if root.is_dir() else []
        if len(entries) == 1 and entries[0].is_dir():
            root = entries[0]
            continue
        return root
    return root


def _class_dirs(root: Path, max_depth: int) -> list[Path]:
    """Sub-folders that hold at least one image file (at any depth up to `max_depth`)."""
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not _ignored(p)):
        if any(_is_image_name(f) for f in _walk_files(sub, max_depth)):
            out.append(sub)
    return out


def detect_layout(root: Path, config: DataConfig) -> str:
    """Return "kaggle" or "folders" for the dataset at `root`.

    A forced `config.layout` is honoured but still checked, so a wrong setting fails here with
    a clear message rather than later with an empty dataset.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} is not a folder")
    labels = root / config.labels_file
    has_kaggle = labels.is_file()
    if config.layout == "kaggle" or (config.layout == "auto" and has_kaggle):
        if not has_kaggle:
            raise DataError(
                f"data.layout is 'kaggle' but {labels} does not exist "
                f"(data.labels_file={config.labels_file!r})"
            )
        return "kaggle"
    classes = _class_dirs(root, config.max_name_depth)
    if len(classes) >= 1:
        return "folders"
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir() if not _ignored(p))[:10]
    raise DataError(
        f"cannot tell the layout of {root}: expected either a labels file {config.labels_file!r} with an "
        f"image folder {config.image_dir!r} (kaggle), or one sub-folder of images per class (folders); "
        f"found {found}"
    )


def _capped_lines(fh: IO[str], path: Path, limit: int) -> Iterator[str]:
    """The lines of `fh`, refusing one longer than `limit` characters before it is all in memory."""
    number = 0
    while line := fh.readline(limit + 1):
        number += 1
        if len(line) > limit and not line.endswith("\n"):
            raise DataError(f"{path} line {number} is longer than {limit} characters: not a labels file")
        yield line


def _read_labels_csv(path: Path, config: DataConfig) -> list[tuple[int, str, str]]:
    """(line number, id, label) rows of a labels CSV; DataError when it has no usable header.

    The file's size and row count are capped (data.max_labels_file_bytes, data.max_label_rows):
    every row is held in memory.
    """
    size = path.stat().st_size
    if size > config.max_labels_file_bytes:
        raise DataError(
            f"{path} is {size} bytes, more than data.max_labels_file_bytes={config.max_labels_file_bytes}"
        )
    try:
        # utf-8-sig: Excel and pandas exports often start with a BOM that would hide the first column.
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(_capped_lines(fh, path, MAX_LABELS_LINE_CHARS))
            header = next(reader, None)
            if header is None:
                raise DataError(
                    f"{path} is empty: expected a header with columns "
                    f"{config.id_column!r} and {config.label_column!r}"
                )
            header = [h.strip() for h in header]
            missing = [c for c in (config.id_column, config.label_column) if c not in header]
            if missing:
                found = header[:20] if len(header) <= 20 else [*header[:20], "..."]
                raise DataError(
                    f"{path} has no column(s) {missing}; columns found: {[h[:80] for h in found]} "
                    "(set data.id_column / data.label_column)"
                )
            i_id, i_label = header.index(config.id_column), header.index(config.label_column)
            rows = []
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(rows) >= config.max_label_rows:
                    raise DataError(
                        f"{path} has more than data.max_label_rows={config.max_label_rows} rows "
                        f"(line {reader.line_num})"
                    )
                cells = row + [""] * (len(header) - len(row))
                rows.append((reader.line_num, cells[i_id].strip(), cells[i_label].strip()))
            return rows
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from None
    except csv.Error as exc:
        raise DataError(f"{path} is not a readable CSV file: {exc}") from None


def _image_index(
    image_dir: Path, config: DataConfig, problems: list[str]
) -> tuple[dict[str, Path], dict[str, Path]]:
    """Image files of a folder by exact name and by stem (for ids given without extension)."""
    by_name: dict[str, Path] = {}
    by_stem: dict[str, Path] = {}
    for f in sorted(image_dir.iterdir()):
        if f.is_file() and not _ignored(f) and _is_image_name(f):
            problem = _name_problem(f"{image_dir.name}/{f.name}", config)
            if problem:
                problems.append(problem)
                continue
            by_name[f.name] = f
            by_stem.setdefault(f.stem, f)  # sorted: '.jpeg' before '.jpg' before '.png'
    return by_name, by_stem


def _list_kaggle(root: Path, config: DataConfig) -> tuple[list[tuple[Path, str]], list[str]]:
    labels_path = root / config.labels_file
    image_dir = root if config.image_dir in ("", ".") else root / config.image_dir
    if not image_dir.is_dir():
        raise DataError(
            f"image folder {image_dir} (data.image_dir={config.image_dir!r}) does not exist "
            f"next to {labels_path.name}"
        )
    rows = _read_labels_csv(labels_path, config)
    if not rows:
        raise DataError(f"{labels_path} has a header but no rows")
    problems: list[str] = []
    by_name, by_stem = _image_index(image_dir, config, problems)
    labels_of: dict[str, list[str]] = defaultdict(list)
    first_line: dict[str, int] = {}
    for line, image_id, label in rows:
        if not image_id:
            problems.append(f"{labels_path.name} line {line}: empty {config.id_column!r}")
            continue
        if not label:
            problems.append(f"{labels_path.name} line {line}: id {shown_name(image_id)} has an empty label")
            continue
        why = label_problem(label, config.max_label_chars)
        if why:
            problems.append(
                f"{labels_path.name} line {line}: id {shown_name(image_id)} has a label {shown_name(label)} that "
                f"{why} (ignored)"
            )
            continue
        if image_id in labels_of and label in labels_of[image_id]:
            problems.append(
                f"{labels_path.name} line {line}: id {shown_name(image_id)} listed again with the same "
                f"label {label!r} (first on line {first_line[image_id]})"
            )
            continue
        first_line.setdefault(image_id, line)
        labels_of[image_id].append(label)
    items: list[tuple[Path, str]] = []
    used: set[Path] = set()
    for image_id, labels in labels_of.items():
        path = by_name.get(image_id) or by_stem.get(image_id)
        if path is None:
            problems.append(
                f"id {shown_name(image_id)} in {labels_path.name} has no image file in {image_dir.name}/"
            )
            continue
        used.add(path)
        if len(labels) > 1:
            # Both rows are kept: the manifest marks the file "label conflict" so it is counted, not lost.
            problems.append(f"id {shown_name(image_id)} in {labels_path.name} has conflicting labels {labels}")
        items.extend((path, label) for label in labels)
    for f in by_name.values():
        if f not in used:
            problems.append(f"{image_dir.name}/{f.name} has no row in {labels_path.name}")
    return items, problems


def _list_folders(root: Path, config: DataConfig) -> tuple[list[tuple[Path, str]], list[str]]:
    items: list[tuple[Path, str]] = []
    problems: list[str] = []
    for class_dir in _class_dirs(root, config.max_name_depth):
        why = label_problem(class_dir.name, config.max_label_chars)
        if why:
            problems.append(
                f"folder {shown_name(class_dir.name)}: its name {why}, so it cannot be a label (its images are "
                "ignored)"
            )
            continue
        for f in sorted(_walk_files(class_dir, config.max_name_depth, problems)):
            rel = f.relative_to(root)
            if any(part.startswith(".") or part in _IGNORED_NAMES for part in rel.parts):
                continue
            problem = _name_problem(rel.as_posix(), config)
            if problem:
                problems.append(problem)
            elif _is_image_name(f):
                items.append((f, class_dir.name))
            else:
                problems.append(f"{rel} is not an image file name (ignored)")
    for f in sorted(root.iterdir()):
        if f.is_file() and not _ignored(f) and _is_image_name(f):
            problem = _name_problem(f.name, config)
            problems.append(problem or f"{f.name} is at the top level, outside any class folder (ignored)")
    return items, problems


def list_labelled_images(root: Path, config: DataConfig) -> tuple[list[tuple[Path, str]], list[str]]:
    """(image path, label) pairs of the dataset at `root`, and the problems found.

    Kaggle layout: ids may be given with or without the file extension; an id listed twice with
    different labels yields both pairs (the manifest then quarantines the file as a label conflict).
    Folders layout: the label is the top-level folder name; images may sit in sub-folders.
    """
    root = Path(root)
    layout = detect_layout(root, config)
    items, problems = _list_kaggle(root, config) if layout == "kaggle" else _list_folders(root, config)
    if not items:
        raise DataError(
            f"no labelled images found in {root} ({layout} layout); problems: {problems[:5] or 'none'}"
        )
    log.info("%s layout: %d labelled images, %d problems in %s", layout, len(items), len(problems), root)
    return items, problems


def find_unlabelled(root: Path, config: DataConfig) -> list[Path]:
    """Kaggle's unlabelled images (``test/``), sorted; empty for other layouts."""
    root = Path(root)
    if detect_layout(root, config) != "kaggle":
        return []
    test_dir = root / UNLABELLED_DIR
    if not test_dir.is_dir() or test_dir.resolve() == (root / config.image_dir).resolve():
        return []
    found = sorted(f for f in test_dir.iterdir() if f.is_file() and not _ignored(f) and _is_image_name(f))
    bad = [f for f in found if _name_problem(f"{UNLABELLED_DIR}/{f.name}", config)]
    if bad:
        log.warning("%d unlabelled file(s) break the name rules and are left out, e.g. %s", len(bad),
                    shown_name(bad[0].name))
    return [f for f in found if f not in bad]
