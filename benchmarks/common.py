"""Shared helpers of the benchmarks: settings, generated datasets, timers and memory probes.

Generated datasets are cached under ``benchmarks/results/data`` (git-ignored) keyed by their
parameters, so a rerun skips the ~30-60 s it takes to render 5,000 JPEGs.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DATA_DIR = RESULTS_DIR / "data"
CACHE_ROOT = DATA_DIR / "cache"  # decoded-image caches of the generated datasets (verified on open)
SAMPLE_CLASSES = 4
SOURCE_SIZE = 224  # side of the generated JPEGs in pixels (the size photos are commonly fed at)

log = logging.getLogger("benchmarks")


@dataclass(frozen=True)
class Settings:
    """What a benchmark run does; `run.py` builds it from the command line.

    Attributes:
        quick: Smoke-run sizes (seconds, not minutes; the numbers are noisy).
        images: Generated images for the cache, bottleneck and pipeline benchmarks.
        memory_images: Generated 224 px images for the peak-RSS benchmark.
        seed: Seed of the generated data and of every model.
        bench_data: Folder with ``animals3/`` and ``weights/`` (real photos, ImageNet weights).
        work: Scratch folder of this run (caches, candidate folders); removed at the end.
    """

    quick: bool
    images: int
    memory_images: int
    seed: int
    bench_data: Path
    work: Path


@dataclass
class Result:
    """One benchmark's outcome: a headline ratio against its baseline, plus absolute figures.

    Attributes:
        name: Benchmark name (``cache``, ``bottleneck``, ...).
        title: What is compared, for the summary table.
        baseline: "<value> <unit>" of the baseline, for the summary table.
        project: "<value> <unit>" of the project's path.
        ratio: Headline ratio; > 1 means the project's path is better (None when skipped).
        ratio_meaning: How to read `ratio`.
        details: Every absolute number measured (JSON-serialisable).
        notes: Secondary figures, printed under the summary table.
        skipped: Why the benchmark did not run, or None.
    """

    name: str
    title: str
    baseline: str = ""
    project: str = ""
    ratio: float | None = None
    ratio_meaning: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None


def median(values: list[float]) -> float:
    """Median of a non-empty list (robust to one slow epoch on a shared machine)."""
    return float(statistics.median(values))


@contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    """``with stopwatch() as elapsed: ...``; ``elapsed()`` gives seconds so far (frozen at exit)."""
    start = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())


def epoch_timer() -> Any:
    """A Keras callback: wall time of every epoch in ``.seconds``, first `fit` start in ``.train_begin``."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []
            self.train_begin: float | None = None  # time.perf_counter() when the first fit began
            self._start = 0.0

        def on_train_begin(self, logs: dict | None = None) -> None:
            if self.train_begin is None:
                self.train_begin = time.perf_counter()

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def steady_epochs(seconds: list[float]) -> list[float]:
    """Epoch times without the first one (tf.function tracing), unless it is the only one."""
    return seconds[1:] if len(seconds) > 1 else seconds


def generated_dataset(n_images: int, seed: int, *, size: int = SOURCE_SIZE) -> Path:
    """An ingested dataset folder of ~`n_images` generated JPEGs (cached between runs).

    The sample generator's textured shapes in ``SAMPLE_CLASSES`` classes, written as one
    folder per class and ingested by `ml.data.ingest.ingest` (manifest, splits, hash), exactly
    as the pipeline ingests a real folder.
    """
    from ml.config import DataConfig
    from ml.data.ingest import ingest
    from ml.data.sample import make_sample_dataset

    per_class = max(4, -(-n_images // SAMPLE_CLASSES))  # ceil: at least n_images in all
    root = DATA_DIR / f"sample-{SAMPLE_CLASSES}x{per_class}-{size}px-seed{seed}"
    marker = root / "ready.json"
    if marker.is_file():
        dataset_dir = Path(json.loads(marker.read_text())["dataset_dir"])
        if (dataset_dir / "manifest.parquet").is_file() and (dataset_dir / "dataset.json").is_file():
            return dataset_dir
    shutil.rmtree(root, ignore_errors=True)
    with stopwatch() as elapsed:
        make_sample_dataset(
            root / "src", classes=SAMPLE_CLASSES, per_class=per_class, size=size, seed=seed, layout="folders"
        )
        log.info("generated %d %d px JPEGs in %.1f s", SAMPLE_CLASSES * per_class, size, elapsed())
        info = ingest(str(root / "src"), root / "work", DataConfig())
    log.info("ingested %s (%d ok images) in %.1f s in all", info["dataset_dir"], info["n_ok"], elapsed())
    marker.write_text(json.dumps({"dataset_dir": info["dataset_dir"], "n_ok": info["n_ok"]}))
    return Path(info["dataset_dir"])


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def proc_status_mb(*keys: str) -> dict[str, float]:
    """Fields of /proc/self/status (e.g. VmHWM, RssAnon, RssFile) in MiB."""
    wanted, out = set(keys), {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name in wanted:
                out[name] = int(value.split()[0]) / 1024  # kB
    return out


class MemorySampler:
    """Samples RssAnon and RssFile of this process in a thread and keeps their maxima (MiB).

    VmHWM (peak RSS) counts mapped file pages too: a memmap that training has read is
    resident but reclaimable. The anonymous peak is the memory the process cannot give back.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak: dict[str, float] = {"RssAnon": 0.0, "RssFile": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def _sample(self) -> None:
        for key, value in proc_status_mb("RssAnon", "RssFile").items():
            self.peak[key] = max(self.peak[key], value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def machine_info() -> dict[str, Any]:
    """CPU count, load and library versions, recorded with every result file."""
    import platform

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    from importlib.metadata import PackageNotFoundError, version

    for package in ("tensorflow-cpu", "tensorflow", "keras", "numpy", "opencv-python-headless"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            continue
    return info


def fmt(value: float, unit: str, digits: int = 1) -> str:
    """``"123.4 img/s"``."""
    return f"{value:,.{digits}f} {unit}"
