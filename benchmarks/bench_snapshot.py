"""6. The price of sharing nothing: a fresh worker materialises the dataset from the store.

For the demo's dataset (750 images, 64 px) and for `--memory-images` 224 px images (5,000 by
default), on a private SeaweedFS on loopback: the one-off publish of the snapshot (tar packs,
manifest, index), then a fresh worker's `local_dataset` (download every pack, verify it, unpack,
verify every image's sha256), against the baseline of copying the same files from a local folder
(what a shared volume would have given for free). Also: rebuilding the decoded-image cache locally
vs fetching it as one object of the same size from the store (which way caches should travel).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.common import Result, Settings, fmt, generated_dataset, log

MODEL = "bench"


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _one(store, dataset_dir: Path, work: Path, label: str) -> dict:
    from ml.config import PipelineConfig
    from ml.data.image_cache import build_image_cache
    from ml.data.snapshot import local_dataset, publish_snapshot

    started = time.perf_counter()
    published = publish_snapshot(store, MODEL, dataset_dir)
    publish_s = time.perf_counter() - started
    config = PipelineConfig.from_dict({"work_dir": str(work / f"fresh-{label}"),
                                       "storage": {"bucket": store.bucket, "model_name": MODEL}})
    started = time.perf_counter()
    folder = local_dataset(config, store, published["dataset_hash"])
    materialise_s = time.perf_counter() - started
    started = time.perf_counter()
    shutil.copytree(dataset_dir / "images", work / f"copy-{label}")
    copy_s = time.perf_counter() - started
    # Caches: decode again here, or download a same-size object from the store?
    started = time.perf_counter()
    cache = build_image_cache(folder, 96, work / f"cache-{label}")
    rebuild_s = time.perf_counter() - started
    cache_file = cache.folder / "images.u8"
    key = f"{MODEL}/bench-cache/{uuid.uuid4().hex}"
    store.put_file(key, cache_file)
    started = time.perf_counter()
    store.download_file(key, work / f"fetched-{label}.u8")
    fetch_s = time.perf_counter() - started
    return {"images": int(cache.meta["shape"][0]), "bytes": published.get("bytes") or _folder_bytes(folder),
            "packs": published.get("packs"), "publish_s": publish_s, "materialise_s": materialise_s,
            "copy_s": copy_s, "cache_rebuild_s": rebuild_s, "cache_fetch_s": fetch_s,
            "cache_bytes": cache_file.stat().st_size}


def run(settings: Settings) -> list[Result]:
    from ml.registry.seaweed import SeaweedServer
    from ml.registry.store import ObjectStore

    sizes = {"demo": (750, 64), "large": (settings.memory_images, 224)}
    if settings.quick:
        sizes = {"demo": (120, 64), "large": (240, 224)}
    server = SeaweedServer(Path(tempfile.mkdtemp(prefix="bench-snapshot-", dir=settings.work)))
    server.start(timeout=90)
    results = []
    try:
        for label, (n, size) in sizes.items():
            store = ObjectStore(f"bench-{uuid.uuid4().hex[:8]}", endpoint_url=server.endpoint_url,
                                access_key=server.access_key, secret_key=server.secret_key)
            store.ensure_bucket()
            d = _one(store, generated_dataset(n, settings.seed, size=size), settings.work, label)
            log.info("snapshot %s: %s", label, d)
            per_image_ms = 1000 * d["materialise_s"] / max(d["images"], 1)
            results.append(Result(
                name=f"snapshot_{label}",
                title=f"fresh worker gets {d['images']} x {size} px images from the store",
                baseline=fmt(d["copy_s"], "s", 2) + " local copy", project=fmt(d["materialise_s"], "s", 2),
                ratio=d["copy_s"] / d["materialise_s"],
                ratio_meaning="local copy s / materialise s (< 1: the price of a worker that shares no disk)",
                details=d,
                notes=[f"{d['bytes'] / 1e6:.1f} MB in {d['packs']} pack(s); publish once {d['publish_s']:.2f} s; "
                       f"materialise {per_image_ms:.2f} ms/image (download, verify, unpack, sha256 per image)",
                       f"decoded cache: rebuild locally {d['cache_rebuild_s']:.2f} s vs fetch "
                       f"{d['cache_bytes'] / 1e6:.1f} MB from the store {d['cache_fetch_s']:.2f} s"]))
    finally:
        server.stop()
    return results
