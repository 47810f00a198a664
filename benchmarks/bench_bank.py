"""6. The augmented bottleneck bank on real photos, and the head against logistic regression.

animals3 (600 photos) with the genuine MobileNet v1 alpha 0.25 224 px ImageNet file, both
sides `ml.training.fit.train_candidate` with augmentation on (the default distortions), same
seed, each in a fresh cache root (no feature hit):

- ``bottleneck_augmented``: ``frozen_phase: backbone`` (every augmented image through the frozen
  backbone every epoch, up to `BACKBONE_EPOCHS`, early stopping) vs the default ``frozen_phase:
  bank`` (``bank_views`` augmented views per image through the backbone once, then the head on
  features until early stopping). Ratio = frozen-phase seconds (train summary
  ``frozen_phase_s``: feature extraction + head fit, or the fit through the backbone) of the
  backbone side / the bank side; the test accuracies of both are in the notes.
- ``head_vs_logreg``: scikit-learn ``LogisticRegression`` (lbfgs, default C) fitted on the
  un-augmented pooled features of the training images (the bank's view 0, the bottleneck cache)
  vs the project's head from the bank run; ratio = test accuracy head / logreg (>= 0.99 wanted).

Run alone: ``python -m benchmarks.bench_bank [--views 2,5,8] [--backbone-epochs 30]`` prints
one JSON line per setting (used to choose the default ``bank_views``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_animals import ALPHA, TRANSFER_SIZE, WEIGHTS_FILE, bench_data_dir
from benchmarks.common import Result, Settings, log

BACKBONE_EPOCHS = 30  # through the backbone an epoch costs seconds: a budget, early stopping may end it
QUICK_BACKBONE_EPOCHS = 2
WITHIN_POINTS = 1.0  # the bank's test accuracy should be within 1 point of the backbone side (or better)


def run(settings: Settings) -> list[Result]:
    photos = settings.bench_data / "animals3"
    weights = settings.bench_data / "weights" / WEIGHTS_FILE
    missing = [str(p) for p in (photos, weights) if not p.exists()]
    if missing:
        reason = f"bench data not found: {', '.join(missing)} (set ML_BENCH_DATA)"
        log.warning("bank: SKIPPED: %s", reason)
        return [Result(name=n, title="animals3, real weights", skipped=reason)
                for n in ("bottleneck_augmented", "head_vs_logreg")]
    epochs = QUICK_BACKBONE_EPOCHS if settings.quick else BACKBONE_EPOCHS
    with _animals3(photos) as (dataset_dir, tmp):
        backbone = train_and_score(dataset_dir, tmp, weights, settings.seed, "backbone", {"epochs": epochs})
        bank = train_and_score(dataset_dir, tmp, weights, settings.seed, "bank", {})
        logreg = logreg_accuracy(dataset_dir, Path(bank["cache_root"]), bank["features_path"], settings.seed)
    results = [_bank_result(backbone, bank), _logreg_result(bank, logreg)]
    if settings.quick:  # a smoke run: the baseline stops long before it has learnt
        results[0].notes.append(f"--quick: the backbone side ran {epochs} epochs: ratio and accuracy gap mean nothing")
    return results


class _animals3:
    """Ingest animals3 into a temporary folder outside the repository (removed on exit)."""

    def __init__(self, photos: Path) -> None:
        self.photos = photos

    def __enter__(self) -> tuple[Path, Path]:
        from ml.config import DataConfig
        from ml.data.ingest import ingest

        self.tmp = Path(tempfile.mkdtemp(prefix="ml-bench-bank-"))
        info = ingest(str(self.photos), self.tmp / "work", DataConfig())
        log.info("bank: animals3 %d ok images, splits %s", info["n_ok"], info["extra"]["splits"])
        return Path(info["dataset_dir"]), self.tmp

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def train_and_score(
    dataset_dir: Path, tmp: Path, weights: Path, seed: int, phase: str, options: dict[str, Any],
    *, cache_key: str | None = None,
) -> dict[str, Any]:
    """Train transfer_mobilenet (augmentation on) with `frozen_phase` = `phase`; its test accuracy and timings.

    Each run gets a fresh cache root (so the features are computed and timed) unless runs share a
    `cache_key` (the sweep's learning rates: one bank, several heads).
    """
    from ml.config import TrainConfig
    from ml.evaluation.metrics import evaluate_predictions
    from ml.training.fit import train_candidate
    from ml.training.predict import predict_split

    candidate = "transfer_mobilenet"
    key = f"{phase}-" + "-".join(f"{k}{v}" for k, v in sorted(options.items()))
    config = TrainConfig(
        candidates=(candidate,), image_size=TRANSFER_SIZE, weights=str(weights), seed=seed,
        candidate_options={candidate: {"alpha": ALPHA, "frozen_phase": phase, **options}},
    )
    cache_root, out = tmp / "cache" / (cache_key or key), tmp / "candidates" / key
    started = time.perf_counter()
    summary = train_candidate(dataset_dir, candidate, out, config, cache_root=cache_root)
    y_true, probs, labels = predict_split(out / "model.keras", dataset_dir, "test", cache_root=cache_root)
    metrics = evaluate_predictions(y_true, probs, labels)
    features = summary.get("bottleneck") or {}
    result = {
        "phase": phase,
        "options": options,
        "test_accuracy": metrics["accuracy"],
        "test_images": metrics["n"],
        "val_accuracy": summary["val_accuracy"],
        "epochs_run": summary["epochs_run"],
        "best_epoch": summary["best_epoch"],
        "frozen_phase_s": summary["frozen_phase_s"],
        "train_wall_time_s": summary["wall_time_s"],
        "bank_views": features.get("bank_views"),
        "features_path": features.get("path"),
        "cache_root": str(cache_root),
        "total_s": round(time.perf_counter() - started, 1),
    }
    log.info("bank: %s test accuracy %.3f, frozen phase %.1f s (%d epochs)", key, result["test_accuracy"],
             result["frozen_phase_s"], result["epochs_run"])
    return result


def logreg_accuracy(dataset_dir: Path, cache_root: Path, features_path: str, seed: int) -> dict[str, Any]:
    """Test accuracy of scikit-learn's LogisticRegression on the cached un-augmented pooled features."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from ml.data.image_cache import build_image_cache

    cache = build_image_cache(dataset_dir, TRANSFER_SIZE, cache_root)  # a hit: the run built it
    features = np.load(cache_root / features_path)  # train summaries name it relative to the cache root
    train, test = cache.split_indices("train"), cache.split_indices("test")
    started = time.perf_counter()
    model = LogisticRegression(max_iter=5000, random_state=seed)
    model.fit(features[train], cache.label_indices(train))
    accuracy = float(np.mean(model.predict(features[test]) == cache.label_indices(test)))
    return {"test_accuracy": accuracy, "fit_s": round(time.perf_counter() - started, 2), "C": model.C}


def _bank_result(backbone: dict[str, Any], bank: dict[str, Any]) -> Result:
    gap = (bank["test_accuracy"] - backbone["test_accuracy"]) * 100
    verdict = (
        f"bank within {WITHIN_POINTS:g} point of the backbone side ({gap:+.1f} points)"
        if gap >= -WITHIN_POINTS
        else f"bank LESS ACCURATE than through the backbone by {-gap:.1f} points (> {WITHIN_POINTS:g})"
    )
    return Result(
        name="bottleneck_augmented",
        title=f"animals3 augmented frozen phase (mobilenet a{ALPHA} {TRANSFER_SIZE}px ImageNet), "
        f"{bank['bank_views']} views",
        baseline=f"{backbone['frozen_phase_s']:.1f} s",
        project=f"{bank['frozen_phase_s']:.1f} s",
        ratio=backbone["frozen_phase_s"] / max(bank["frozen_phase_s"], 1e-9),
        ratio_meaning="frozen-phase s through the backbone (augmented) / s on the augmented bank (build + head)",
        notes=[
            f"test accuracy: backbone {backbone['test_accuracy']:.3f} ({backbone['epochs_run']} epochs), "
            f"bank {bank['test_accuracy']:.3f} ({bank['epochs_run']} head epochs), n={bank['test_images']}",
            verdict,
        ],
        details={"backbone": backbone, "bank": bank, "accuracy_gap_points": gap, "verdict": verdict},
    )


def _logreg_result(bank: dict[str, Any], logreg: dict[str, Any]) -> Result:
    ratio = bank["test_accuracy"] / max(logreg["test_accuracy"], 1e-9)
    return Result(
        name="head_vs_logreg",
        title="animals3 test acc: project head (bank) vs sklearn LogisticRegression on the same features",
        baseline=f"{logreg['test_accuracy']:.3f} acc",
        project=f"{bank['test_accuracy']:.3f} acc",
        ratio=ratio,
        ratio_meaning="test accuracy of the project's head / LogisticRegression's (>= 0.99 wanted)",
        notes=[f"LogisticRegression fit in {logreg['fit_s']:.2f} s; head: {bank['epochs_run']} epochs, "
               f"best {bank['best_epoch']}" + ("" if ratio >= 0.99 else "; BELOW 0.99")],
        details={"head": bank, "logreg": logreg},
    )


def main(argv: list[str] | None = None) -> int:
    import logging

    parser = argparse.ArgumentParser(description="bank sweep on animals3: one JSON line per setting")
    parser.add_argument("--views", default="5", help="comma-separated bank_views values")
    parser.add_argument("--learning-rates", default="", help="comma-separated head learning rates (default: config)")
    parser.add_argument("--backbone-epochs", type=int, default=0, help="also run the backbone side (0: skip)")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = bench_data_dir()
    weights = data / "weights" / WEIGHTS_FILE
    rates = [float(r) for r in args.learning_rates.split(",") if r] or [None]
    with _animals3(data / "animals3") as (dataset_dir, tmp):
        if args.backbone_epochs:
            result = train_and_score(dataset_dir, tmp, weights, args.seed, "backbone", {"epochs": args.backbone_epochs})
            print("BANK_SWEEP " + json.dumps(result), flush=True)
        for views in (int(v) for v in args.views.split(",")):
            for rate in rates:
                options: dict[str, Any] = {"bank_views": views, **({"learning_rate": rate} if rate else {})}
                result = train_and_score(dataset_dir, tmp, weights, args.seed, "bank", options,
                                         cache_key=f"views{views}")
                result["logreg"] = logreg_accuracy(dataset_dir, Path(result["cache_root"]), result["features_path"],
                                                   args.seed)
                print("BANK_SWEEP " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
