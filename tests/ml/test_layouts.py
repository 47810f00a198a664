from __future__ import annotations

from pathlib import Path

import pytest

from ml.config import DataConfig
from ml.data.layouts import detect_layout, find_dataset_root, find_unlabelled, list_labelled_images
from ml.errors import DataError


def kaggle_tree(
    root: Path,
    csv_text: str | bytes,
    files: list[str],
    *,
    image_dir: str = "train",
    labels_file: str = "labels.csv",
) -> Path:
    (root / image_dir).mkdir(parents=True)
    for name in files:
        (root / image_dir / name).write_bytes(b"\xff\xd8\xff fake")
    data = csv_text.encode("utf-8") if isinstance(csv_text, str) else csv_text
    (root / labels_file).write_bytes(data)
    return root


def pairs(items: list[tuple[Path, str]]) -> list[tuple[str, str]]:
    return sorted((p.name, label) for p, label in items)


def test_kaggle_basic_with_bom_quotes_and_unicode(tmp_path: Path) -> None:
    csv_text = '\ufeffid,breed\r\na1,"chow, chow"\r\n"b2",  café_dog \r\nc3,柴犬\r\n'
    root = kaggle_tree(tmp_path, csv_text, ["a1.jpg", "b2.png", "c3.jpeg"])

    items, problems = list_labelled_images(root, DataConfig())

    assert detect_layout(root, DataConfig()) == "kaggle"
    assert pairs(items) == [("a1.jpg", "chow, chow"), ("b2.png", "café_dog"), ("c3.jpeg", "柴犬")]
    assert problems == []


def test_kaggle_problems_are_reported(tmp_path: Path) -> None:
    csv_text = "id,breed\nok,pug\nmissing,pug\ndup,pug\ndup,pug\nboth,pug\nboth,husky\nblank,\n"
    root = kaggle_tree(tmp_path, csv_text, ["ok.jpg", "dup.jpg", "both.jpg", "blank.jpg", "orphan.jpg"])

    items, problems = list_labelled_images(root, DataConfig())

    assert pairs(items) == [("both.jpg", "husky"), ("both.jpg", "pug"), ("dup.jpg", "pug"), ("ok.jpg", "pug")]
    text = "\n".join(problems)
    assert "'missing'" in text and "no image file" in text
    assert "'dup'" in text and "same label" in text
    assert "'both'" in text and "conflicting labels" in text
    assert "'blank' has an empty label" in text
    assert "train/orphan.jpg has no row" in text
    assert "train/blank.jpg has no row" in text
    assert len(problems) == 6


def test_configurable_columns_files_and_ids_with_extension(tmp_path: Path) -> None:
    config = DataConfig(labels_file="meta.csv", id_column="file", label_column="class", image_dir="imgs")
    root = kaggle_tree(tmp_path, "file;x\n", [], image_dir="imgs", labels_file="meta.csv")
    (root / "meta.csv").write_text("class,file\ncat,x.jpg\ndog,y\n")
    (root / "imgs" / "x.jpg").write_bytes(b"1")
    (root / "imgs" / "y.webp").write_bytes(b"2")

    items, problems = list_labelled_images(root, config)

    assert pairs(items) == [("x.jpg", "cat"), ("y.webp", "dog")]
    assert problems == []


@pytest.mark.parametrize(
    ("csv_text", "message"),
    [
        (
            "image,label\na,b\n",
            r"labels.csv has no column\(s\) \['id', 'breed'\]; columns found: \['image', 'label'\]",
        ),
        ("", "is empty"),
        ("id,breed\n", "no rows"),
        (b"id,breed\nx,\xff\xfe\n", "not UTF-8"),
    ],
)
def test_bad_labels_file_raises_naming_file(tmp_path: Path, csv_text: str | bytes, message: str) -> None:
    root = kaggle_tree(tmp_path, csv_text, ["a.jpg"])

    with pytest.raises(DataError, match=message):
        list_labelled_images(root, DataConfig())


def test_folders_layout_ignores_litter(tmp_path: Path) -> None:
    for name in (
        "cats/a.jpg",
        "cats/sub/b.png",
        "dogs/c.JPG",
        "dogs/notes.txt",
        "dogs/.DS_Store",
        "__MACOSX/cats/._a.jpg",
        "stray.jpg",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")

    items, problems = list_labelled_images(tmp_path, DataConfig())

    assert detect_layout(tmp_path, DataConfig()) == "folders"
    assert pairs(items) == [("a.jpg", "cats"), ("b.png", "cats"), ("c.JPG", "dogs")]
    assert any("notes.txt" in p for p in problems) and any("stray.jpg" in p for p in problems)
    assert find_unlabelled(tmp_path, DataConfig()) == []


def test_unknown_layout_and_forced_kaggle_fail_clearly(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("hi")

    with pytest.raises(DataError, match="cannot tell the layout.*readme.md"):
        detect_layout(tmp_path, DataConfig())
    with pytest.raises(DataError, match="layout is 'kaggle' but .*labels.csv does not exist"):
        detect_layout(tmp_path, DataConfig(layout="kaggle"))


def test_forced_folders_layout_ignores_labels_file(tmp_path: Path) -> None:
    root = kaggle_tree(tmp_path, "id,breed\na,pug\n", ["a.jpg"])

    assert detect_layout(root, DataConfig(layout="folders")) == "folders"
    items, _ = list_labelled_images(root, DataConfig(layout="folders"))
    assert pairs(items) == [("a.jpg", "train")]


def test_unlabelled_and_wrapped_root(tmp_path: Path) -> None:
    root = kaggle_tree(tmp_path / "wrap" / "dog-breed", "id,breed\na,pug\n", ["a.jpg"])
    (root / "test").mkdir()
    (root / "test" / "t1.jpg").write_bytes(b"x")
    (root / "test" / "t2.png").write_bytes(b"x")
    (tmp_path / "wrap" / "__MACOSX").mkdir()

    found = find_dataset_root(tmp_path, DataConfig())

    assert found == root
    assert [p.name for p in find_unlabelled(found, DataConfig())] == ["t1.jpg", "t2.png"]


# --------------------------------------------------------------------------- label and name rules


def test_bad_labels_become_problem_lines_not_classes(tmp_path: Path) -> None:
    long_label = "x" * 201
    csv_text = f'id,breed\nok,pug\nlong,{long_label}\nnul,"pu\x00g"\nesc,"\x1b[31mred"\nnewline,"two\nlines"\n'
    root = kaggle_tree(tmp_path, csv_text, ["ok.jpg", "long.jpg", "nul.jpg", "esc.jpg", "newline.jpg"])

    items, problems = list_labelled_images(root, DataConfig())

    assert pairs(items) == [("ok.jpg", "pug")]
    text = "\n".join(problems)
    assert "line 3: id 'long' has a label 'xxx" in text
    assert "is 201 characters long, more than data.max_label_chars=200" in text
    assert "id 'nul' has a label 'pu\\x00g' that contains the control character U+0000 (ignored)" in text
    assert "id 'esc'" in text and "U+001B" in text
    assert "id 'newline'" in text and "U+000A" in text
    assert all("\x00" not in p and "\x1b" not in p and "\n" not in p for p in problems)  # printable lines


def test_label_length_limit_is_a_setting(tmp_path: Path) -> None:
    root = kaggle_tree(tmp_path, "id,breed\na,abcdef\nb,abcde\n", ["a.jpg", "b.jpg"])

    items, problems = list_labelled_images(root, DataConfig(max_label_chars=5))

    assert pairs(items) == [("b.jpg", "abcde")]
    assert "'abcdef' that is 6 characters long, more than data.max_label_chars=5" in "\n".join(problems)


def test_labels_file_over_its_byte_limit_is_refused_before_parsing(tmp_path: Path) -> None:
    root = kaggle_tree(tmp_path, "id,breed\n" + "a,pug\n" * 200, ["a.jpg"])

    with pytest.raises(DataError, match=r"labels.csv is 1209 bytes, more than data.max_labels_file_bytes=1000"):
        list_labelled_images(root, DataConfig(max_labels_file_bytes=1000))


def test_labels_file_over_its_row_limit_is_refused(tmp_path: Path) -> None:
    root = kaggle_tree(tmp_path, "id,breed\n" + "".join(f"i{n},pug\n" for n in range(11)), ["i0.jpg"])

    with pytest.raises(DataError, match=r"labels.csv has more than data.max_label_rows=10 rows \(line 12\)"):
        list_labelled_images(root, DataConfig(max_label_rows=10))
    assert list_labelled_images(root, DataConfig(max_label_rows=11))[0]


def test_a_giant_line_is_refused_before_it_is_read_whole(tmp_path: Path) -> None:
    from ml.data import layouts

    root = kaggle_tree(tmp_path, "id,breed\na," + "p" * (layouts.MAX_LABELS_LINE_CHARS + 10) + "\n", ["a.jpg"])

    with pytest.raises(DataError, match=r"labels.csv line 2 is longer than 1048576 characters"):
        list_labelled_images(root, DataConfig())


def test_folder_names_that_cannot_be_labels_or_paths_are_problems(tmp_path: Path) -> None:
    deep = "good/" + "d/" * 40 + "e.jpg"
    for rel in ("good/a.jpg", "bad\x1bname/b.jpg", "x" * 201 + "/c.jpg", "good/new\nline.jpg", deep):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    undecodable = tmp_path.as_posix().encode() + b"/good/\xff\xfe.jpg"  # not UTF-8: Python sees surrogates
    with open(undecodable, "wb") as fh:
        fh.write(b"x")

    items, problems = list_labelled_images(tmp_path, DataConfig())

    assert pairs(items) == [("a.jpg", "good")]
    text = "\n".join(problems)
    assert "folder 'bad\\x1bname': its name contains the control character U+001B" in text
    assert "is 201 characters long, more than data.max_label_chars=200" in text
    assert "file 'good/new\\nline.jpg': control character U+000A in name is not allowed (ignored)" in text
    assert "more than data.max_name_depth=32 levels deep (ignored)" in text
    assert "name is not valid UTF-8 (ignored)" in text
    for problem in problems:
        problem.encode("utf-8")  # every line can be logged and written to dataset.json


def test_a_very_deep_folder_tree_is_walked_without_recursion(tmp_path: Path) -> None:
    import os

    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "a.jpg").write_bytes(b"x")
    # 1,200 levels: pathlib's recursive rglob raises RecursionError here. Built relative to the
    # previous level (dir_fd) to stay under PATH_MAX.
    fd = os.open(tmp_path / "cls", os.O_RDONLY)
    try:
        for _ in range(1200):
            os.mkdir("d", dir_fd=fd)
            new = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = new
    finally:
        os.close(fd)
    try:
        items, problems = list_labelled_images(tmp_path, DataConfig())

        assert pairs(items) == [("a.jpg", "cls")]
        assert any("more than data.max_name_depth=32 levels deep" in p for p in problems)
    finally:
        top = tmp_path / "cls"  # shutil.rmtree recurses per level too: lift the chain one level at a time
        while (top / "d" / "d").is_dir():
            os.rename(top / "d" / "d", top / "x")
            os.rmdir(top / "d")
            os.rename(top / "x", top / "d")
