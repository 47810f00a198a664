from __future__ import annotations

import json
import logging
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import requests

from ml.config import DataConfig
from ml.data import kaggle as kaggle_mod
from ml.data.ingest import ingest, load_dataset
from ml.data.manifest import dataset_hash
from ml.data.sample import make_sample_dataset
from ml.data.sources import parse_source
from ml.errors import DataError, SourceError, UnsafeArchiveError

CONFIG = DataConfig(val_percent=20.0, test_percent=20.0, seed=3)
SECRET = "s3cr3t-kaggle-key-0123456789"


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sample") / "dog-breed-identification"
    make_sample_dataset(root, classes=3, per_class=6, size=32, seed=11)
    return root


def zip_folder(folder: Path, archive: Path, *, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, prefix + f.relative_to(folder).as_posix())
    return archive


class FakeStore:
    """The ObjectStore surface ingest uses: iter_objects, head, download_file, for_bucket."""

    def __init__(self, bucket: str, objects: dict[str, Path]) -> None:
        self.bucket, self.objects, self.buckets = bucket, objects, {bucket: self}

    def for_bucket(self, name: str) -> FakeStore:
        return self.buckets[name]

    def iter_objects(self, prefix: str) -> list[dict[str, object]]:
        keys = sorted(k for k in self.objects if k.startswith(prefix))
        return [{"key": k, "size": self.objects[k].stat().st_size} for k in keys]

    def head(self, key: str) -> dict[str, object] | None:
        return {"size": self.objects[key].stat().st_size} if key in self.objects else None

    def download_file(self, key: str, path: Path, *, max_bytes: int | None = None) -> None:
        assert max_bytes is not None and self.objects[key].stat().st_size <= max_bytes
        shutil.copyfile(self.objects[key], path)


def test_local_folder_is_published_by_content_hash(sample: Path, tmp_path: Path) -> None:
    out = ingest(str(sample), tmp_path, CONFIG)

    dataset_dir = Path(out["dataset_dir"])
    meta, manifest = load_dataset(dataset_dir)
    assert dataset_dir == tmp_path / "datasets" / out["dataset_hash"]
    assert [p.name for p in (tmp_path / "datasets").iterdir()] == [out["dataset_hash"]]  # no temp left
    assert meta == {k: v for k, v in out.items() if k != "dataset_dir"}
    assert dataset_hash(manifest) == out["dataset_hash"]
    assert out["layout"] == "kaggle" and out["n_images"] == 18 and out["n_ok"] == 18
    assert out["counts"] == {label: 6 for label in out["labels"]}
    assert out["extra"]["n_unlabelled"] == 2
    assert sorted(p.suffix for p in (dataset_dir / "unlabelled").iterdir()) == [".csv", ".jpg", ".jpg"]
    assert all((dataset_dir / p).is_file() and p.startswith("images/train/") for p in manifest["path"])
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert all(
        min(c.values()) >= 1
        for c in manifest.groupby("label")["split"]
        .value_counts()
        .unstack(fill_value=0)
        .to_dict("index")
        .values()
    )


def test_zip_of_same_content_reuses_the_dataset(
    sample: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = ingest(str(sample), tmp_path, CONFIG)
    archive = zip_folder(sample, tmp_path / "upload.zip", prefix="dog-breed-identification/")

    with caplog.at_level(logging.INFO, logger="ml.data.ingest"):
        second = ingest(str(archive), tmp_path, CONFIG)

    assert second["dataset_hash"] == first["dataset_hash"]
    assert second["created_at"] == first["created_at"]
    assert "reused" in caplog.text
    assert len(list((tmp_path / "datasets").iterdir())) == 1


def test_folders_layout_with_other_names_has_same_hash(sample: Path, tmp_path: Path) -> None:
    labels = pd.read_csv(sample / "labels.csv")
    folders = tmp_path / "folders"
    for i, row in enumerate(labels.itertuples()):
        (folders / row.breed).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample / "train" / f"{row.id}.jpg", folders / row.breed / f"img{i}.jpg")

    out = ingest(str(folders), tmp_path / "w1", CONFIG)

    assert out["layout"] == "folders"
    assert out["dataset_hash"] == ingest(str(sample), tmp_path / "w2", CONFIG)["dataset_hash"]


def test_changed_split_settings_rewrite_splits_of_reused_dataset(sample: Path, tmp_path: Path) -> None:
    ingest(str(sample), tmp_path, CONFIG)

    out = ingest(str(sample), tmp_path, DataConfig(val_percent=10.0, test_percent=30.0, seed=99))

    meta, manifest = load_dataset(Path(out["dataset_dir"]))
    assert meta["extra"]["split_config"] == {"val_percent": 10.0, "test_percent": 30.0, "seed": 99}
    assert out["extra"]["split_config"]["seed"] == 99


def test_s3_folder_and_zip_object(sample: Path, tmp_path: Path) -> None:
    archive = zip_folder(sample, tmp_path / "ds.zip")
    objects = {f"raw/dogs/{f.relative_to(sample).as_posix()}": f for f in sample.rglob("*") if f.is_file()}
    objects["zips/ds.zip"] = archive
    store = FakeStore("other", {})
    store.buckets["data"] = FakeStore("data", objects)

    from_folder = ingest("s3://data/raw/dogs", tmp_path / "a", CONFIG, store=store)
    from_zip = ingest("s3://data/zips/ds.zip", tmp_path / "b", CONFIG, store=store)

    assert from_folder["dataset_hash"] == from_zip["dataset_hash"]
    assert from_folder["source"] == "s3://data/raw/dogs"


def test_s3_without_store_or_objects_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="needs an object store client"):
        ingest("s3://data/raw", tmp_path, CONFIG)
    with pytest.raises(SourceError, match="no objects under s3://data/raw/"):
        ingest("s3://data/raw", tmp_path, CONFIG, store=FakeStore("data", {}))
    assert list((tmp_path / "datasets").iterdir()) == []


def test_unsafe_zip_publishes_nothing(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cats/a.jpg", b"x")
        zf.writestr("../../escape.txt", b"gotcha")

    with pytest.raises(UnsafeArchiveError, match="'../../escape.txt'"):
        ingest(str(archive), tmp_path / "work", CONFIG)

    assert list((tmp_path / "work" / "datasets").iterdir()) == []
    assert not list(tmp_path.rglob("escape.txt"))


def test_all_quarantined_is_a_data_error(tmp_path: Path) -> None:
    for name in ("a/1.jpg", "a/2.jpg", "b/1.jpg"):
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_text("not an image")

    with pytest.raises(DataError, match="no usable images.*not an image"):
        ingest(str(tmp_path / "src"), tmp_path / "work", CONFIG)
    assert list((tmp_path / "work" / "datasets").iterdir()) == []


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "no data source"),
        ("ftp://x/y", "unsupported source scheme"),
        ("/no/such/dir", "does not exist"),
        ("kaggle:competitions/", "must be kaggle:competitions"),
        ("kaggle:datasets/only-slug", "must be"),
    ],
)
def test_bad_source_strings(source: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        parse_source(source)


class FakeKaggleApi:
    """Stands in for kaggle's KaggleApi at the network boundary."""

    def __init__(self, archive: Path | None = None, error: BaseException | None = None) -> None:
        self.archive, self.error, self.calls = archive, error, []

    def authenticate(self) -> None:
        import os

        self.calls.append(("authenticate", os.environ.get("KAGGLE_USERNAME"), os.environ.get("KAGGLE_KEY")))

    def competition_download_files(self, name: str, path: str, quiet: bool) -> None:
        self.calls.append(("competition", name))
        if self.error is not None:
            raise self.error
        shutil.copyfile(self.archive, Path(path) / f"{name}.zip")

    def dataset_download_files(self, name: str, path: str, quiet: bool, unzip: bool) -> None:
        self.calls.append(("dataset", name))
        shutil.copyfile(self.archive, Path(path) / f"{name.split('/')[1]}.zip")


def http_error(code: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = code
    return requests.HTTPError(
        f"{code} Client Error for url https://www.kaggle.com/api?key={SECRET}", response=response
    )


def test_kaggle_competition_and_dataset(
    sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    api = FakeKaggleApi(zip_folder(sample, tmp_path / "comp.zip"))
    monkeypatch.setattr(kaggle_mod, "api_factory", lambda: api)

    comp = ingest(
        "kaggle:competitions/dog-breed-identification",
        tmp_path / "w",
        CONFIG,
        kaggle_credentials=("alice", SECRET),
    )
    data = ingest("kaggle:datasets/alice/dogs", tmp_path / "w", CONFIG, kaggle_credentials=("alice", SECRET))

    assert comp["dataset_hash"] == data["dataset_hash"]
    assert comp["n_ok"] == 18
    assert api.calls[:2] == [("authenticate", "alice", SECRET), ("competition", "dog-breed-identification")]
    assert ("dataset", "alice/dogs") in api.calls
    import os

    assert "KAGGLE_KEY" not in os.environ  # restored after use


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            http_error(403),
            r"accept the rules on https://www.kaggle.com/competitions/dog-breed-identification/rules",
        ),
        (http_error(401), "refused the credentials"),
        (http_error(404), "no competition 'dog-breed-identification'"),
        (
            requests.ConnectionError(f"Max retries exceeded key={SECRET}"),
            "network unreachable.*point data.source at the .zip",
        ),
        (ConnectionError("offline"), "network unreachable"),
        (RuntimeError(f"weird failure with {SECRET}"), "weird failure with \\*\\*\\*"),
    ],
)
def test_kaggle_failures_become_source_errors_without_the_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: BaseException,
    message: str,
) -> None:
    monkeypatch.setattr(kaggle_mod, "api_factory", lambda: FakeKaggleApi(error=error))

    with caplog.at_level(logging.DEBUG), pytest.raises(SourceError, match=message) as err:
        ingest(
            "kaggle:competitions/dog-breed-identification",
            tmp_path,
            CONFIG,
            kaggle_credentials=("bob", SECRET),
        )

    assert SECRET not in str(err.value) and SECRET not in caplog.text
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert list((tmp_path / "datasets").iterdir()) == []


def test_kaggle_without_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(kaggle_mod, "api_factory", lambda: pytest.fail("must not reach the API"))

    with pytest.raises(SourceError, match="no Kaggle credentials.*KAGGLE_USERNAME and KAGGLE_KEY"):
        ingest("kaggle:competitions/dog-breed-identification", tmp_path, CONFIG)


def test_dataset_json_is_valid_json_with_contract_keys(sample: Path, tmp_path: Path) -> None:
    out = ingest(str(sample), tmp_path, CONFIG)

    meta = json.loads((Path(out["dataset_dir"]) / "dataset.json").read_text())
    assert {
        "dataset_hash",
        "source",
        "layout",
        "labels",
        "counts",
        "n_images",
        "n_ok",
        "n_quarantined",
        "created_at",
        "extra",
    } <= set(meta)


# --------------------------------------------------------------------------- limits


def test_too_many_classes_fail_before_any_image_is_inspected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ml.data import ingest as ingest_mod

    for c in range(6):
        (tmp_path / "src" / f"class{c}").mkdir(parents=True)
        (tmp_path / "src" / f"class{c}" / "a.jpg").write_bytes(b"x")
    monkeypatch.setattr(ingest_mod, "build_manifest", lambda *a, **k: pytest.fail("manifest was built"))

    with pytest.raises(DataError, match=r"has 6 classes, more than data.max_classes=5 \(e.g. 'class0', "):
        ingest(str(tmp_path / "src"), tmp_path / "work", DataConfig(max_classes=5))
    assert list((tmp_path / "work" / "datasets").iterdir()) == []


def test_nested_archives_share_the_source_byte_budget(tmp_path: Path) -> None:
    # Three small zips inside a zip, each unpacking to 100 kB: alone each fits 250 kB, together not.
    with zipfile.ZipFile(tmp_path / "outer.zip", "w") as outer:
        for i in range(3):
            with zipfile.ZipFile(tmp_path / f"inner{i}.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
                zf.writestr(f"c{i}/x.bin", bytes(100_000))
            outer.write(tmp_path / f"inner{i}.zip", f"inner{i}.zip")

    with pytest.raises(UnsafeArchiveError, match=r"'c2/x.bin': total uncompressed size reaches 100000 bytes, more"):
        ingest(str(tmp_path / "outer.zip"), tmp_path / "work", DataConfig(max_archive_bytes=250_000))
    assert list((tmp_path / "work" / "datasets").iterdir()) == []


def test_s3_keys_naming_one_file_twice_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    store = FakeStore("data", {"raw/cats/a.jpg": tmp_path / "a.jpg", "raw/cats//a.jpg": tmp_path / "a.jpg"})

    with pytest.raises(SourceError, match=r"object 'cats/a.jpg': appears twice under s3://data/raw/"):
        ingest("s3://data/raw", tmp_path / "work", CONFIG, store=store)


def test_s3_key_where_a_folder_must_be_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    store = FakeStore("data", {"raw/cats": tmp_path / "a.jpg", "raw/cats/a.jpg": tmp_path / "a.jpg"})

    with pytest.raises(SourceError, match=r"object 'cats/a.jpg': its parent 'cats' is a file entry"):
        ingest("s3://data/raw", tmp_path / "work", CONFIG, store=store)


def test_s3_listing_stops_at_the_object_limit(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    listed: list[str] = []

    class EndlessStore(FakeStore):
        def iter_objects(self, prefix: str) -> Iterator[dict[str, object]]:
            for i in range(10**9):  # a listing that never ends must not be read to its end
                listed.append(f"{prefix}{i}.jpg")
                yield {"key": listed[-1], "size": 1}

    with pytest.raises(SourceError, match=r"s3://data/raw/ holds more than 20 objects \(data.max_archive_entries\)"):
        ingest("s3://data/raw", tmp_path / "work", DataConfig(max_archive_entries=20), store=EndlessStore("data", {}))
    assert len(listed) == 21


def test_every_download_and_extraction_logs_one_line_with_its_size(
    sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    archive = zip_folder(sample, tmp_path / "comp.zip")
    monkeypatch.setattr(kaggle_mod, "api_factory", lambda: FakeKaggleApi(archive))
    store = FakeStore("other", {})
    store.buckets["data"] = FakeStore("data", {"zips/ds.zip": archive})
    n_files = sum(1 for f in sample.rglob("*") if f.is_file())
    with zipfile.ZipFile(archive) as zf:
        unpacked_mb = f"{sum(i.file_size for i in zf.infolist()) / 1e6:.1f} MB"
    zipped_mb = f"{archive.stat().st_size / 1e6:.1f} MB"

    with caplog.at_level(logging.INFO, logger="ml.data"):
        ingest("kaggle:competitions/dog-breed-identification", tmp_path / "k", CONFIG,
               kaggle_credentials=("alice", SECRET))
        ingest("s3://data/zips/ds.zip", tmp_path / "s", CONFIG, store=store)

    lines = [(r.name, r.getMessage().split(" in ")[0]) for r in caplog.records if r.getMessage().endswith("MB/s)")]
    assert lines == [
        ("ml.data.kaggle", f"downloaded 1 file(s) ({zipped_mb}) of kaggle:competitions/dog-breed-identification"),
        ("ml.data.extract", f"extracted {n_files} files ({unpacked_mb}) from dog-breed-identification.zip"),
        ("ml.data.sources", f"fetched 1 objects ({zipped_mb}) from s3://data/zips/"),
        ("ml.data.extract", f"extracted {n_files} files ({unpacked_mb}) from ds.zip"),
    ]


def test_a_kaggle_competition_keeps_its_sample_submission_with_the_test_images(
    sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ml.serving.submission import competition_sample

    monkeypatch.setattr(kaggle_mod, "api_factory", lambda: FakeKaggleApi(zip_folder(sample, tmp_path / "c.zip")))

    out = ingest("kaggle:competitions/dog-breed-identification", tmp_path / "w", CONFIG,
                 kaggle_credentials=("alice", SECRET))

    dataset_dir = Path(out["dataset_dir"])
    kept = dataset_dir / "unlabelled" / "sample_submission.csv"
    assert kept.read_bytes() == (sample / "sample_submission.csv").read_bytes()
    assert out["extra"]["sample_submission"] == "unlabelled/sample_submission.csv"
    assert competition_sample(dataset_dir) == kept


def test_a_dataset_without_a_test_set_has_no_sample_submission(tmp_path: Path) -> None:
    from ml.serving.submission import competition_sample

    make_sample_dataset(tmp_path / "src", classes=2, per_class=6, size=32, seed=2, layout="folders")

    out = ingest(str(tmp_path / "src"), tmp_path / "w", CONFIG)

    assert out["extra"]["sample_submission"] is None
    assert competition_sample(Path(out["dataset_dir"])) is None
