"""6. The augmented bottleneck bank on real photos, and the head against logistic regression.

animals3 (600 photos) with the genuine MobileNet v1 alpha 0.25 224 px ImageNet file, both
sides `ml.training.fit.train_candidate` with augmentation on (the default distortions), same
seed, each in a fresh cache root (no feature hit):

- ``bottleneck_augmented``: ``frozen_phase: backbone`` (every augmented image through the frozen
  backbone every epoch, up to `BACKBONE_EPOCHS`, early stopping) vs the default ``frozen_phase:
  bank`` (``bank_views`` augmented views per image through the backbone once, then the head on
  features until early stopping). The arms run bank, backbone, bank (each bank run in its own
  fresh cache root), so load that changes during the long baseline hits the project's side on
  both ends. Ratio = frozen-phase seconds (train summary ``frozen_phase_s``: feature extraction +
  head fit, or the fit through the backbone) of the backbone side / the mean of the two bank
  runs; the test accuracies are in the notes (the two bank runs, same seed, must agree).
- ``head_vs_logreg``: the project's head vs scikit-learn ``LogisticRegression`` (lbfgs, C=1) on
  the same un-augmented pooled features, over `HEAD_SPLITS` stratified re-splits of all images
  (the manifest's train/val/test sizes; split s uses seed + s): the head is built, compiled and
  fitted with what a transfer candidate's head on bottleneck features gets (`CandidateSettings`
  defaults: head learning rate, epoch cap, early stopping on val loss with the best weights
  restored); LogisticRegression fits the train part. Ratio = median over the splits of test
  accuracy head / logreg (>= 0.99 wanted); the minimum and the bank run's own head (manifest
  split, trained on the augmented bank) vs LogisticRegression are in the notes.

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

HEAD_SPLITS = 8  # re-splits of the head comparison: 1 test image is 0.9 points, one split is noise
QUICK_HEAD_SPLITS = 2
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
    splits = QUICK_HEAD_SPLITS if settings.quick else HEAD_SPLITS
    with _animals3(photos) as (dataset_dir, tmp):
        # bank, backbone, bank: the slow baseline sits between two measurements of the project's side.
        first = train_and_score(dataset_dir, tmp, weights, settings.seed, "bank", {}, cache_key="bank-first")
        backbone = train_and_score(dataset_dir, tmp, weights, settings.seed, "backbone", {"epochs": epochs})
        second = train_and_score(dataset_dir, tmp, weights, settings.seed, "bank", {}, cache_key="bank-second")
        features = Path(first["cache_root"]) / first["features_path"]
        logreg = logreg_accuracy(dataset_dir, Path(first["cache_root"]), first["features_path"], settings.seed)
        heads = head_vs_logreg_splits(dataset_dir, Path(first["cache_root"]), features, settings.seed, splits)
    results = [_bank_result(backbone, first, second), _logreg_result(first, logreg, heads)]
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
    # Runs sharing a cache (the sweep's heads on one bank) still get their own candidate folder.
    cache_root, out = tmp / "cache" / (cache_key or key), tmp / "candidates" / f"{cache_key or ''}{key}"
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


def head_vs_logreg_splits(
    dataset_dir: Path, cache_root: Path, features_path: Path, seed: int, splits: int,
    overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Test accuracy of the project's head and of LogisticRegression on `splits` stratified re-splits.

    Both see the same un-augmented pooled features (the bottleneck cache); the head also gets the
    val part for early stopping, as in training. Head then logreg per split (interleaved).
    `overrides` replaces head settings (``learning_rate``, ``epochs``, ``early_stopping_patience``).
    """
    import dataclasses

    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    from ml.config import TrainConfig
    from ml.data.image_cache import build_image_cache
    from ml.training.settings import CandidateSettings

    cache = build_image_cache(dataset_dir, TRANSFER_SIZE, cache_root)  # a hit: the bank run built it
    features = np.asarray(np.load(features_path), dtype=np.float32)
    labels = cache.label_indices()
    n_val, n_test = len(cache.split_indices("val")), len(cache.split_indices("test"))
    candidate = "transfer_mobilenet"
    settings = CandidateSettings.for_candidate(
        TrainConfig(candidates=(candidate,), image_size=TRANSFER_SIZE, seed=seed,
                    candidate_options={candidate: {"alpha": ALPHA, "augment": False}}),
        candidate,
    )
    settings = dataclasses.replace(settings, **(overrides or {}))
    out = []
    for split in range(splits):
        everything = np.arange(len(labels))
        rest, test = train_test_split(everything, test_size=n_test, stratify=labels, random_state=seed + split)
        train, val = train_test_split(rest, test_size=n_val, stratify=labels[rest], random_state=seed + split)
        started = time.perf_counter()
        head = fit_head(features, labels, train, val, settings)
        head_s = time.perf_counter() - started
        head_acc = float(np.mean(np.argmax(head["model"].predict(features[test], verbose=0), axis=1) == labels[test]))
        started = time.perf_counter()
        model = LogisticRegression(max_iter=5000, random_state=seed)
        model.fit(features[train], labels[train])
        logreg_s = time.perf_counter() - started
        logreg_acc = float(np.mean(model.predict(features[test]) == labels[test]))
        row = {"split_seed": seed + split, "head_accuracy": head_acc, "logreg_accuracy": logreg_acc,
               "ratio": head_acc / max(logreg_acc, 1e-9), "head_epochs": head["epochs"],
               "head_best_epoch": head["best_epoch"], "head_s": round(head_s, 2), "logreg_s": round(logreg_s, 2),
               "n_test": len(test)}
        log.info("bank: head vs logreg split %d: %.3f vs %.3f (head %d epochs, best %d, %.1f s)", split, head_acc,
                 logreg_acc, head["epochs"], head["best_epoch"], head_s)
        out.append(row)
    return out


def fit_head(features: Any, labels: Any, train: Any, val: Any, settings: Any) -> dict[str, Any]:
    """The head a transfer candidate trains on bottleneck features, on the given rows.

    The pieces of `ml.training.fit.fit_on_bottlenecks`' no-augmentation path: `build_head` with the
    candidate's head options, `compile_model` at its learning rate, `make_callbacks` (early stopping
    on val loss with the best weights restored, LR halving on plateaus), a seeded reshuffle every
    epoch, `settings.epochs` as the cap.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from ml.models.transfer import build_head
    from ml.training.callbacks import make_callbacks
    from ml.training.fit import compile_model, seed_everything
    from ml.training.input_pipeline import shuffled_each_epoch

    seed_everything(settings.seed)
    k = int(labels.max()) + 1
    head = build_head(features.shape[1], k, dropout=settings.transfer.dropout, head_units=settings.transfer.head_units)
    compile_model(head, settings.learning_rate, settings.label_smoothing)
    one_hot = np.eye(k, dtype=np.float32)
    state: list[Any] = []
    train_ds = shuffled_each_epoch((features[train], one_hot[labels[train]]), settings.seed, state)
    val_ds = tf.data.Dataset.from_tensor_slices((features[val], one_hot[labels[val]]))
    with tempfile.TemporaryDirectory(prefix="ml-bench-head-") as work:
        callbacks = [c for c in make_callbacks(Path(work), Path(work), settings.early_stopping_patience, True)
                     if not isinstance(c, keras.callbacks.TensorBoard)]
        history = head.fit(train_ds.batch(settings.batch_size), validation_data=val_ds.batch(settings.batch_size),
                           epochs=settings.epochs, callbacks=callbacks, shuffle=False, verbose=0)
    curve = history.history["val_loss"]
    return {"model": head, "epochs": len(curve), "best_epoch": int(np.argmin(curve)) + 1}


def view_speed(dataset_dir: Path, tmp: Path, weights: Path, seed: int, rounds: int) -> dict[str, Any]:
    """Seconds per bank view of the training images: chained Keras layers vs the fused warp.

    Keras: ``split_dataset(..., augment=...)`` (the through-the-backbone path's augmenter, what
    bank version 1 used); fused: `ml.training.bank._views_dataset` (version 2). Each round times
    both, alternating which goes first, pixels only and pixels + the frozen backbone.
    """
    import statistics

    from ml.data.image_cache import build_image_cache
    from ml.models.transfer import build_transfer, feature_extractor
    from ml.training.bank import _views_dataset
    from ml.training.input_pipeline import AugmentConfig, split_dataset

    cache = build_image_cache(dataset_dir, TRANSFER_SIZE, tmp / "cache" / "view-speed")
    rows, augment = cache.split_indices("train"), AugmentConfig()
    extractor = feature_extractor(build_transfer("mobilenet", 3, TRANSFER_SIZE, options={"alpha": ALPHA},
                                                 weights=str(weights)))

    def keras_view(r: int) -> Any:
        return split_dataset(cache, "train", batch_size=32, rows=rows, augment=augment, seed=seed + r).map(
            lambda x, y: x)

    def fused_view(r: int) -> Any:
        return _views_dataset(cache, rows, augment, 1, seed + r, 32)

    arms = {"keras": keras_view, "fused": fused_view}
    times: dict[str, list[float]] = {f"{a}_{w}": [] for a in arms for w in ("pixels", "features")}
    for make in arms.values():  # untimed: traces and the page cache
        extractor.predict(make(-1), verbose=0)
    for r in range(rounds):
        for name in (("keras", "fused") if r % 2 == 0 else ("fused", "keras")):
            started = time.perf_counter()
            for _ in arms[name](r):
                pass
            times[f"{name}_pixels"].append(time.perf_counter() - started)
            started = time.perf_counter()
            extractor.predict(arms[name](r), verbose=0)
            times[f"{name}_features"].append(time.perf_counter() - started)
    medians = {k: round(statistics.median(v), 3) for k, v in times.items()}
    return {"images": len(rows), "rounds": rounds, "median_s": medians, "all_s": times,
            "pixels_ratio": medians["keras_pixels"] / medians["fused_pixels"],
            "features_ratio": medians["keras_features"] / medians["fused_features"]}


def _bank_result(backbone: dict[str, Any], bank: dict[str, Any], again: dict[str, Any]) -> Result:
    bank_s = (bank["frozen_phase_s"] + again["frozen_phase_s"]) / 2
    gap = (bank["test_accuracy"] - backbone["test_accuracy"]) * 100
    verdict = (
        f"bank within {WITHIN_POINTS:g} point of the backbone side ({gap:+.1f} points)"
        if gap >= -WITHIN_POINTS
        else f"bank LESS ACCURATE than through the backbone by {-gap:.1f} points (> {WITHIN_POINTS:g})"
    )
    same = bank["test_accuracy"] == again["test_accuracy"]
    return Result(
        name="bottleneck_augmented",
        title=f"animals3 augmented frozen phase (mobilenet a{ALPHA} {TRANSFER_SIZE}px ImageNet), "
        f"{bank['bank_views']} views",
        baseline=f"{backbone['frozen_phase_s']:.1f} s",
        project=f"{bank_s:.1f} s",
        ratio=backbone["frozen_phase_s"] / max(bank_s, 1e-9),
        ratio_meaning="frozen-phase s through the backbone (augmented) / mean s of two augmented-bank runs "
        "(build + head) before and after it",
        notes=[
            f"test accuracy: backbone {backbone['test_accuracy']:.3f} ({backbone['epochs_run']} epochs), "
            f"bank {bank['test_accuracy']:.3f} ({bank['epochs_run']} head epochs, best {bank['best_epoch']}), "
            f"n={bank['test_images']}",
            f"bank runs: {bank['frozen_phase_s']:.1f} s before the baseline, {again['frozen_phase_s']:.1f} s after; "
            + ("same test accuracy (same seed)" if same else
               f"DIFFERENT test accuracy with the same seed ({again['test_accuracy']:.3f})"),
            verdict,
        ],
        details={"backbone": backbone, "bank": bank, "bank_again": again, "accuracy_gap_points": gap,
                 "verdict": verdict},
    )


def _logreg_result(bank: dict[str, Any], logreg: dict[str, Any], splits: list[dict[str, Any]]) -> Result:
    import statistics

    ratios = [row["ratio"] for row in splits]
    ratio, low = statistics.median(ratios), min(ratios)
    own = bank["test_accuracy"] / max(logreg["test_accuracy"], 1e-9)
    return Result(
        name="head_vs_logreg",
        title=f"animals3 test acc: project head vs sklearn LogisticRegression, same features, {len(splits)} splits",
        baseline=f"{statistics.median(r['logreg_accuracy'] for r in splits):.3f} acc",
        project=f"{statistics.median(r['head_accuracy'] for r in splits):.3f} acc",
        ratio=ratio,
        ratio_meaning="median over re-splits of test accuracy head / LogisticRegression (>= 0.99 wanted)",
        notes=[
            f"head / logreg over {len(splits)} splits: min {low:.3f}, median {ratio:.3f}, max {max(ratios):.3f}"
            + ("" if low >= 0.99 else "; min BELOW 0.99"),
            "head epochs (best) per split: "
            + ", ".join(f"{r['head_epochs']} ({r['head_best_epoch']})" for r in splits),
            f"the bank run's head (augmented bank, manifest split): {bank['test_accuracy']:.3f} vs LogisticRegression "
            f"{logreg['test_accuracy']:.3f} = {own:.3f} ({bank['epochs_run']} epochs, best {bank['best_epoch']}); "
            f"LogisticRegression fit {logreg['fit_s']:.2f} s",
        ],
        details={"splits": splits, "bank_head": bank, "logreg": logreg, "min_ratio": low, "bank_run_ratio": own},
    )


def main(argv: list[str] | None = None) -> int:
    import logging

    parser = argparse.ArgumentParser(description="bank sweep on animals3: one JSON line per setting")
    parser.add_argument("--views", default="5", help="comma-separated bank_views values")
    parser.add_argument("--learning-rates", default="", help="comma-separated head learning rates (default: config)")
    parser.add_argument("--backbone-epochs", type=int, default=0, help="also run the backbone side (0: skip)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--heads", default="", help="head sweep instead: ;-separated settings such as "
                        "'learning_rate=0.01,early_stopping_patience=10,epochs=500' (one bank run for the features)")
    parser.add_argument("--splits", type=int, default=HEAD_SPLITS, help="re-splits of the head sweep")
    parser.add_argument("--view-speed", type=int, default=0, metavar="ROUNDS",
                        help="instead: time one bank view, chained Keras layers vs the fused warp, interleaved")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = bench_data_dir()
    weights = data / "weights" / WEIGHTS_FILE
    rates = [float(r) for r in args.learning_rates.split(",") if r] or [None]
    with _animals3(data / "animals3") as (dataset_dir, tmp):
        if args.view_speed:
            print("VIEW_SPEED " + json.dumps(view_speed(dataset_dir, tmp, weights, args.seed, args.view_speed)))
            return 0
        if args.heads:
            bank = train_and_score(dataset_dir, tmp, weights, args.seed, "bank", {})
            print("BANK_SWEEP " + json.dumps(bank), flush=True)
            features = Path(bank["cache_root"]) / bank["features_path"]
            for setting in args.heads.split(";"):
                overrides = {k: (float(v) if "." in v or "e" in v else int(v))
                             for k, v in (item.split("=") for item in setting.split(",") if item)}
                rows = head_vs_logreg_splits(dataset_dir, Path(bank["cache_root"]), features, args.seed,
                                             args.splits, overrides)
                ratios = sorted(r["ratio"] for r in rows)
                print("HEAD_SWEEP " + json.dumps({"overrides": overrides, "min": ratios[0],
                                                  "median": ratios[len(ratios) // 2] if len(ratios) % 2 else
                                                  (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2,
                                                  "splits": rows}), flush=True)
            return 0
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
