"""Dataset snapshots on a real SeaweedFS: workers share nothing but the store."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ml.config import PipelineConfig
from ml.data import snapshot
from ml.errors import DataError, StorageError
from ml.registry import layout

MODEL = "image-classifier"


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A small ingested dataset (folder layout) with an unlabelled image as Kaggle has them."""
    from ml.config import DataConfig
    from ml.data.ingest import ingest
    from ml.data.sample import make_sample_dataset

    make_sample_dataset(tmp_path / "src", classes=3, per_class=12, size=48, seed=1)
    out = ingest(str(tmp_path / "src"), tmp_path / "ingest-work", DataConfig(min_images_per_class=2))
    return Path(out["dataset_dir"])


def _config(work: Path, store) -> PipelineConfig:
    return PipelineConfig.from_dict({"work_dir": str(work),
                                     "storage": {"bucket": store.bucket, "endpoint_url": store.endpoint_url}})


def _same_files(a: Path, b: Path) -> None:
    from ml.data.ingest import load_dataset
    from ml.data.manifest import OK

    manifest = load_dataset(a)[1]
    for rel in manifest.loc[manifest["status"] == OK, "path"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_a_fresh_worker_materialises_the_published_dataset_by_hash(store, dataset: Path, tmp_path: Path) -> None:
    published = snapshot.publish_snapshot(store, MODEL, dataset)
    digest = published["dataset_hash"]

    folder = snapshot.local_dataset(_config(tmp_path / "worker-b", store), store, {"dataset_hash": digest})

    assert folder == tmp_path / "worker-b" / "datasets" / digest
    assert json.loads((folder / "dataset.json").read_text())["dataset_hash"] == digest
    _same_files(dataset, folder)
    keys = store.list_keys(layout.dataset_prefix(MODEL, digest))
    assert layout.dataset_key(MODEL, digest, "COMPLETE") in keys
    assert sum(k.endswith(".tar") for k in keys) == published["packs"] == 1  # a few large objects
    # Kaggle's test set travels too: what promote needs to write submission.csv on any worker.
    from ml.serving.submission import competition_sample

    sample = competition_sample(folder)
    assert sample is not None and sample.read_bytes() == (dataset / "unlabelled" / "sample_submission.csv").read_bytes()


def test_publishing_twice_reuses_the_snapshot(store, dataset: Path) -> None:
    first = snapshot.publish_snapshot(store, MODEL, dataset)
    keys = store.list_keys(layout.dataset_prefix(MODEL, first["dataset_hash"]))

    second = snapshot.publish_snapshot(store, MODEL, dataset)

    assert second["reused"] is True
    assert store.list_keys(layout.dataset_prefix(MODEL, first["dataset_hash"])) == keys


def test_a_materialised_dataset_is_reused_without_the_store(store, dataset: Path, tmp_path: Path) -> None:
    digest = snapshot.publish_snapshot(store, MODEL, dataset)["dataset_hash"]
    config = _config(tmp_path / "worker", store)
    snapshot.local_dataset(config, store, digest)

    again = snapshot.local_dataset(config, None, digest)  # no store at all: the local copy is used

    assert again == config.work_dir / "datasets" / digest


def test_an_incomplete_snapshot_is_refused(store, dataset: Path, tmp_path: Path) -> None:
    digest = snapshot.publish_snapshot(store, MODEL, dataset)["dataset_hash"]
    store.delete(layout.dataset_key(MODEL, digest, "COMPLETE"))

    with pytest.raises(DataError, match="no complete snapshot"):
        snapshot.local_dataset(_config(tmp_path / "w", store), store, digest)


def _replace_pack(store, digest: str, members: dict[str, bytes]) -> None:
    """A forged pack (with an index that matches it): only the manifest's checks stand."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            archive.addfile(info, io.BytesIO(body))
    data = buffer.getvalue()
    import hashlib

    key = layout.dataset_key(MODEL, digest, "pack-00000.tar")
    store.put_bytes(key, data)
    index = store.get_json(layout.dataset_key(MODEL, digest, "snapshot.json"))
    index["packs"] = [{"name": "pack-00000.tar", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                       "members": len(members)}]
    store.put_json(layout.dataset_key(MODEL, digest, "snapshot.json"), index)


@pytest.mark.parametrize("members, message", [
    ({"../../escaped.txt": b"x"}, "not a plain file inside the dataset"),
    ({"/tmp/escaped.txt": b"x"}, "not a plain file inside the dataset"),
    ({"images/not-in-manifest.jpg": b"x"}, "not in the dataset's manifest"),
])
def test_a_hostile_pack_is_refused_and_nothing_is_written_outside(store, dataset: Path, tmp_path: Path,
                                                                  members: dict, message: str) -> None:
    digest = snapshot.publish_snapshot(store, MODEL, dataset)["dataset_hash"]
    _replace_pack(store, digest, members)
    work = tmp_path / "worker"

    with pytest.raises(StorageError, match=message):
        snapshot.local_dataset(_config(work, store), store, digest)

    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/escaped.txt").exists()
    assert not (work / "datasets" / digest).exists()


def test_a_pack_whose_image_differs_from_the_manifest_is_refused(store, dataset: Path, tmp_path: Path) -> None:
    from ml.data.ingest import load_dataset
    from ml.data.manifest import OK

    digest = snapshot.publish_snapshot(store, MODEL, dataset)["dataset_hash"]
    manifest = load_dataset(dataset)[1]
    first = str(manifest.loc[manifest["status"] == OK, "path"].iloc[0])
    _replace_pack(store, digest, {first: b"not the image the manifest hashed"})

    with pytest.raises(StorageError, match="does not match its sha256"):
        snapshot.local_dataset(_config(tmp_path / "w", store), store, digest)


def test_a_tampered_pack_fails_its_index_checksum(store, dataset: Path, tmp_path: Path) -> None:
    digest = snapshot.publish_snapshot(store, MODEL, dataset)["dataset_hash"]
    key = layout.dataset_key(MODEL, digest, "pack-00000.tar")
    data = bytearray(store.get_bytes(key))
    data[2000] ^= 0xFF
    store.put_bytes(key, bytes(data))

    with pytest.raises(StorageError, match="pack pack-00000.tar of the snapshot does not match"):
        snapshot.local_dataset(_config(tmp_path / "w", store), store, digest)


MATERIALISE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)
from pathlib import Path
from ml.config import PipelineConfig
from ml.data.snapshot import local_dataset
from ml.registry.store import ObjectStore
args = json.loads(sys.argv[1])
config = PipelineConfig.from_dict(args["config"])
store = ObjectStore(config.storage.bucket, endpoint_url=config.storage.endpoint_url, access_key=args["key"],
                    secret_key=args["secret"])
print(local_dataset(config, store, args["hash"]))
"""


def test_processes_on_one_host_materialise_once(store, seaweed, dataset: Path, tmp_path: Path) -> None:
    digest = snapshot.publish_snapshot(store, MODEL, dataset)["dataset_hash"]
    config = _config(tmp_path / "host", store)
    args = json.dumps({"config": config.to_dict(), "key": seaweed.access_key, "secret": seaweed.secret_key,
                       "hash": digest})
    repo = str(Path(__file__).resolve().parents[2])
    procs = [subprocess.Popen([sys.executable, "-c", MATERIALISE, args], cwd=repo, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]

    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-500:] for o in outs]
    logs = "".join(o[1] for o in outs)
    assert logs.count("materialised dataset") == 1  # one download; the others waited and reused it
    assert {o[0].strip() for o in outs} == {str(config.work_dir / "datasets" / digest)}


def test_ingest_stage_hands_on_a_hash_and_a_uri_not_a_path(store, tmp_path: Path) -> None:
    from ml.data.sample import make_sample_dataset
    from ml.pipeline import ingest_stage

    make_sample_dataset(tmp_path / "src", classes=3, per_class=8, size=48, seed=2)
    config = PipelineConfig.from_dict({"work_dir": str(tmp_path / "work"),
                                       "storage": {"bucket": store.bucket, "endpoint_url": store.endpoint_url},
                                       "data": {"source": str(tmp_path / "src"), "min_images_per_class": 2}})

    result = ingest_stage(config, store)

    assert "dataset_dir" not in result
    assert result["dataset_uri"] == store.uri(layout.dataset_prefix(MODEL, result["dataset_hash"]))
    assert str(config.work_dir) not in json.dumps(result)  # `source` is the user's own input, a path here
