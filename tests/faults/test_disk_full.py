"""Fault 6: the disk fills up while extracting, ingesting or caching.

The work dir (or cache root) is a real 512 KiB tmpfs, so the writes fail with ENOSPC from the
kernel. Each stage must fail with a clear error that says the disk is full and where, and must
not publish a partial dataset under ``<work_dir>/datasets/<hash>`` or a partial image cache
(nor leave its temporary folders behind). Cache building runs in a subprocess: writing a
memmap onto a full disk kills a process with SIGBUS, which must not happen.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.faults.conftest import PYTHON, subprocess_env

pytestmark = pytest.mark.faults

TMPFS_SIZE = "512k"


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs mounted for this test (skipped where mounting is not permitted)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture(scope="module")
def big_sample(tmp_path_factory):
    """About 0.8 MB of JPEGs: more than what the small disk holds."""
    from ml.data.sample import make_sample_dataset

    dest = tmp_path_factory.mktemp("big") / "dogs"
    make_sample_dataset(dest, classes=3, per_class=40, size=128, seed=9)
    total = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert total > 700 * 1024, total
    return dest


def _assert_nothing_published(work_dir: Path) -> None:
    datasets = work_dir / "datasets"
    left = sorted(p.name for p in datasets.iterdir()) if datasets.exists() else []
    assert left == [], f"left under {datasets}: {left}"


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_disk_full_during_ingest_or_extraction_publishes_nothing(small_disk, big_sample, tmp_path, kind):
    from ml.config import DataConfig
    from ml.data.ingest import ingest

    source = big_sample
    if kind == "zip":
        source = Path(shutil.make_archive(str(tmp_path / "dogs"), "zip", big_sample.parent, big_sample.name))

    with pytest.raises(OSError) as failure:
        ingest(str(source), small_disk, DataConfig())

    assert failure.value.errno == errno.ENOSPC
    message = str(failure.value)
    assert "no space left on device" in message.lower() and str(small_disk) in message
    _assert_nothing_published(small_disk)
    # With the space back (a bigger volume), the same ingest publishes the dataset.
    summary = ingest(str(source), tmp_path / "roomy", DataConfig())
    assert Path(summary["dataset_dir"]).name == summary["dataset_hash"]


BUILD_CACHE = """
import sys
from ml.data.image_cache import build_image_cache
build_image_cache(sys.argv[1], 96, sys.argv[2])
print("built")
"""


def test_disk_full_while_caching_fails_cleanly_without_sigbus(small_disk, sample_source, tmp_path):
    from ml.config import DataConfig
    from ml.data.ingest import ingest

    summary = ingest(str(sample_source), tmp_path / "work", DataConfig())  # 90 images: 2.5 MB at 96 px
    cache_root = small_disk / "cache"

    done = subprocess.run([PYTHON, "-c", BUILD_CACHE, summary["dataset_dir"], str(cache_root)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)

    assert done.returncode == 1, f"exit {done.returncode} (SIGBUS is -7): {done.stderr[-1500:]}"
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("OSError") and "no space left on device for the image cache" in last, last
    assert str(cache_root) in last
    folder = cache_root / summary["dataset_hash"]
    left = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    assert [name for name in left if not name.endswith(".lock")] == [], f"partial cache left: {left}"
    # The same build on a disk with room succeeds and verifies.
    from ml.data.image_cache import ImageCache, build_image_cache

    roomy = tmp_path / f"cache-{uuid.uuid4().hex[:6]}"
    cache = build_image_cache(summary["dataset_dir"], 96, roomy)
    ImageCache.load(cache.folder, verify=True)
    assert json.loads((cache.folder / "meta.json").read_text())["shape"][0] == summary["n_ok"]
