"""Run the benchmarks (`make bench`): each prints a ratio against a baseline measured in the same process.

    .venv/bin/python benchmarks/run.py                    # everything (~10-15 min on 2 cores)
    .venv/bin/python benchmarks/run.py --quick            # smoke run, small sizes (~2-3 min)
    .venv/bin/python benchmarks/run.py --only cache,pipeline --images 1000

Results: ``benchmarks/results/bench-<UTC time>.json`` and ``latest.json`` (git-ignored), plus a
summary table on stdout. See benchmarks/README.md for what every number means.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import traceback
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ banner would bury the results
if __package__ in (None, ""):
    # Run as a script (`python benchmarks/run.py`): make `ml` and `benchmarks` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, Result, Settings, log, machine_info  # noqa: E402

BENCHMARKS = ("cache", "bottleneck", "pipeline", "memory", "animals3", "bank", "snapshot", "checkpoint",
              "serving")
DEFAULT_IMAGES, QUICK_IMAGES = 2000, 240
DEFAULT_MEMORY_IMAGES, QUICK_MEMORY_IMAGES = 5000, 400


def _run_one(name: str, settings: Settings) -> list[Result]:
    from benchmarks import (
        bench_animals,
        bench_bank,
        bench_bottleneck,
        bench_cache,
        bench_checkpoint,
        bench_memory,
        bench_pipeline,
        bench_serving,
        bench_snapshot,
    )

    runners = {
        "cache": bench_cache.run,
        "bottleneck": bench_bottleneck.run,
        "pipeline": bench_pipeline.run,
        "memory": bench_memory.run,
        "animals3": bench_animals.run,
        "bank": bench_bank.run,  # rows bottleneck_augmented and head_vs_logreg
        "snapshot": bench_snapshot.run,
        "checkpoint": bench_checkpoint.run,
        "serving": bench_serving.run,
    }
    out = runners[name](settings)
    return out if isinstance(out, list) else [out]


def summary_table(results: list[Result]) -> str:
    """A fixed-width table: benchmark, what, baseline, project, ratio."""
    header = ("benchmark", "what", "baseline", "project", "ratio")
    rows = [header]
    for r in results:
        if r.skipped:
            rows.append((r.name, "SKIPPED (below)", "", "", ""))
        elif r.ratio is None:
            rows.append((r.name, r.title, "", "", "FAILED"))
        else:
            rows.append((r.name, r.title, r.baseline, r.project, f"{r.ratio:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    meanings = [f"  {r.name}: ratio = {r.ratio_meaning}" for r in results if r.ratio is not None]
    lines += ["", "ratios (> 1: the project's path is better):", *meanings]
    lines += [f"SKIPPED {r.name}: {r.skipped}" for r in results if r.skipped]
    notes = [f"  {r.name}: {note}" for r in results for note in r.notes]
    if notes:
        lines += ["", "details:", *notes]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, noisy numbers")
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of: {','.join(BENCHMARKS)} (default: all)"
    )
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help=f"generated images for cache/bottleneck/pipeline (default {DEFAULT_IMAGES}, "
        f"quick {QUICK_IMAGES})",
    )
    parser.add_argument(
        "--memory-images",
        type=int,
        default=None,
        help=f"generated 224 px images for memory (default {DEFAULT_MEMORY_IMAGES}, "
        f"quick {QUICK_MEMORY_IMAGES})",
    )
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument(
        "--bench-data",
        type=Path,
        default=None,
        help="animals3/ + weights/ folder (default $ML_BENCH_DATA or /work/shared/bench-data)",
    )
    parser.add_argument("--keep-work", action="store_true", help="keep the run's scratch folder")
    parser.add_argument("-v", "--verbose", action="store_true", help="INFO logs of the ml library too")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; known: {', '.join(BENCHMARKS)}")
    args.names = [n for n in BENCHMARKS if n in names]
    for flag in ("images", "memory_images"):
        value = getattr(args, flag)
        if value is not None and value < 40:
            parser.error(
                f"--{flag.replace('_', '-')} must be >= 40 (every class needs train/val/test images)"
            )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    log.setLevel(logging.INFO)
    from benchmarks.bench_animals import bench_data_dir

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    work = RESULTS_DIR / f"work-{stamp}"
    settings = Settings(
        quick=args.quick,
        images=args.images or (QUICK_IMAGES if args.quick else DEFAULT_IMAGES),
        memory_images=args.memory_images or (QUICK_MEMORY_IMAGES if args.quick else DEFAULT_MEMORY_IMAGES),
        seed=args.seed,
        bench_data=args.bench_data or bench_data_dir(),
        work=work,
    )
    work.mkdir(parents=True, exist_ok=True)
    report = {
        "started": stamp,
        "settings": {**asdict(settings), "benchmarks": args.names},
        "machine": machine_info(),
    }
    results: list[Result] = []
    timings: dict[str, float] = {}
    failed = False
    try:
        for name in args.names:
            log.info("=== %s ===", name)
            started = time.perf_counter()
            try:
                results.extend(_run_one(name, settings))
            except Exception as exc:  # one broken benchmark must not hide the others' numbers
                failed = True
                log.error("benchmark %s failed: %s", name, exc)
                traceback.print_exc()
                results.append(Result(name=name, title=f"FAILED: {type(exc).__name__}: {str(exc)[:200]}"))
            timings[name] = round(time.perf_counter() - started, 1)
            log.info("=== %s done in %.0f s ===", name, timings[name])
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    report.update(
        {
            "finished": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
            "loadavg_end": machine_info()["loadavg"],
            "seconds": timings,
            "results": [asdict(r) for r in results],
        }
    )
    text = json.dumps(report, indent=2, default=str) + "\n"
    path = RESULTS_DIR / f"bench-{stamp}.json"
    path.write_text(text)
    (RESULTS_DIR / "latest.json").write_text(text)
    print()
    print(summary_table(results))
    print(f"\ntotal {sum(timings.values()):.0f} s {timings}; results: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
