"""Dataset layouts: Kaggle's labels-CSV + image folder, or one folder per class.

`list_labelled_images` never silently drops data: everything it cannot use is described in
the returned list of problems (ids without files, files without ids, conflicting duplicates...).
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from ml.errors import DataError

if TYPE_CHECKING:
    from ml.config import DataConfig

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
UNLABELLED_DIR = "test"  # Kaggle's unlabelled images
# Archive and OS litter that is never data.
_IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}


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


def _class_dirs(root: Path) -> list[Path]:
    """Sub-folders that hold at least one image file (at any depth)."""
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not _ignored(p)):
        if any(_is_image_name(f) and f.is_file() for f in sub.rglob("*")):
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
    classes = _class_dirs(root)
    if len(classes) >= 1:
        return "folders"
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir() if not _ignored(p))[:10]
    raise DataError(
        f"cannot tell the layout of {root}: expected either a labels file {config.labels_file!r} with an "
        f"image folder {config.image_dir!r} (kaggle), or one sub-folder of images per class (folders); "
        f"found {found}"
    )


def _read_labels_csv(path: Path, config: DataConfig) -> list[tuple[int, str, str]]:
    """(line number, id, label) rows of a labels CSV; DataError when it has no usable header."""
    try:
        # utf-8-sig: Excel and pandas exports often start with a BOM that would hide the first column.
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataError(
                    f"{path} is empty: expected a header with columns "
                    f"{config.id_column!r} and {config.label_column!r}"
                )
            header = [h.strip() for h in header]
            missing = [c for c in (config.id_column, config.label_column) if c not in header]
            if missing:
                raise DataError(
                    f"{path} has no column(s) {missing}; columns found: {header} "
                    "(set data.id_column / data.label_column)"
                )
            i_id, i_label = header.index(config.id_column), header.index(config.label_column)
            rows = []
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue
                cells = row + [""] * (len(header) - len(row))
                rows.append((reader.line_num, cells[i_id].strip(), cells[i_label].strip()))
            return rows
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from None
    except csv.Error as exc:
        raise DataError(f"{path} is not a readable CSV file: {exc}") from None


def _image_index(image_dir: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Image files of a folder by exact name and by stem (for ids given without extension)."""
    by_name: dict[str, Path] = {}
    by_stem: dict[str, Path] = {}
    for f in sorted(image_dir.iterdir()):
        if f.is_file() and not _ignored(f) and _is_image_name(f):
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
    by_name, by_stem = _image_index(image_dir)
    problems: list[str] = []
    labels_of: dict[str, list[str]] = defaultdict(list)
    first_line: dict[str, int] = {}
    for line, image_id, label in rows:
        if not image_id:
            problems.append(f"{labels_path.name} line {line}: empty {config.id_column!r}")
            continue
        if not label:
            problems.append(f"{labels_path.name} line {line}: id {image_id!r} has an empty label")
            continue
        if image_id in labels_of and label in labels_of[image_id]:
            problems.append(
                f"{labels_path.name} line {line}: id {image_id!r} listed again with the same "
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
            problems.append(f"id {image_id!r} in {labels_path.name} has no image file in {image_dir.name}/")
            continue
        used.add(path)
        if len(labels) > 1:
            # Both rows are kept: the manifest marks the file "label conflict" so it is counted, not lost.
            problems.append(f"id {image_id!r} in {labels_path.name} has conflicting labels {labels}")
        items.extend((path, label) for label in labels)
    for f in by_name.values():
        if f not in used:
            problems.append(f"{image_dir.name}/{f.name} has no row in {labels_path.name}")
    return items, problems


def _list_folders(root: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    items: list[tuple[Path, str]] = []
    problems: list[str] = []
    for class_dir in _class_dirs(root):
        for f in sorted(class_dir.rglob("*")):
            rel = f.relative_to(root)
            if not f.is_file() or any(part.startswith(".") or part in _IGNORED_NAMES for part in rel.parts):
                continue
            if _is_image_name(f):
                items.append((f, class_dir.name))
            else:
                problems.append(f"{rel} is not an image file name (ignored)")
    for f in sorted(root.iterdir()):
        if f.is_file() and not _ignored(f) and _is_image_name(f):
            problems.append(f"{f.name} is at the top level, outside any class folder (ignored)")
    return items, problems


def list_labelled_images(root: Path, config: DataConfig) -> tuple[list[tuple[Path, str]], list[str]]:
    """(image path, label) pairs of the dataset at `root`, and the problems found.

    Kaggle layout: ids may be given with or without the file extension; an id listed twice with
    different labels yields both pairs (the manifest then quarantines the file as a label conflict).
    Folders layout: the label is the top-level folder name; images may sit in sub-folders.
    """
    root = Path(root)
    layout = detect_layout(root, config)
    items, problems = _list_kaggle(root, config) if layout == "kaggle" else _list_folders(root)
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
    return sorted(f for f in test_dir.iterdir() if f.is_file() and not _ignored(f) and _is_image_name(f))
