"""5. Real photos and real ImageNet weights: scratch vs transfer test accuracy on animals3.

Needs ``$ML_BENCH_DATA`` (default ``/work/shared/bench-data``) with ``animals3/`` (600 photos,
cats / dogs / panda) and ``weights/mobilenet_2_5_224_tf_no_top.h5`` (Keras' own MobileNet v1
alpha 0.25 224 px no-top ImageNet file); skipped with a message when they are missing.

The photos are ingested by `ml.data.ingest.ingest` into a temporary folder *outside* the
repository (the data must never be copied into it) and each candidate is trained by
`ml.training.fit.train_candidate` in its own child process, then scored on the test split
with `predict_split` + `evaluate_predictions`:

- ``scratch_small`` (128 px, augmentation on: what the pipeline trains from scratch);
- ``transfer_mobilenet`` alpha 0.25 at 224 px (the weights file's size), ``weights`` = the file's
  path, every other setting the default: augmentation on, so the frozen phase trains the head on
  the augmented bottleneck bank (`ml.training.bank`); the run's ``frozen_phase`` says which path ran;
- the same with ``weights="imagenet"`` and ``KERAS_HOME`` pointing at a temporary folder
  holding the file in ``models/``: proves the Keras-cache path, and that it loads weights
  identical to the explicit file (max |difference| is reported);
- the same with ``weights="none"`` (random backbone): the control that shows the accuracy
  comes from the pretrained features, not from the head.

If transfer does not beat scratch by at least 20 points, something is wrong (preprocessing, BN
mode, weights not loaded, the bank not used); the summary flags it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, Result, Settings, log

WEIGHTS_FILE = "mobilenet_2_5_224_tf_no_top.h5"
ALPHA = 0.25
TRANSFER_SIZE = 224
SCRATCH_SIZE = 128
RESULT_PREFIX = "BENCH_ANIMALS_RESULT "
CHILD_TIMEOUT_S = 1800
CLEAR_WIN = 0.20  # transfer with ImageNet weights should beat scratch by at least 20 points here (issue 13)


def bench_data_dir() -> Path:
    """``$ML_BENCH_DATA`` or ``/work/shared/bench-data``."""
    return Path(os.environ.get("ML_BENCH_DATA") or "/work/shared/bench-data")


def run(settings: Settings) -> Result:
    from ml.config import DataConfig
    from ml.data.ingest import ingest

    photos = settings.bench_data / "animals3"
    weights = settings.bench_data / "weights" / WEIGHTS_FILE
    missing = [str(p) for p in (photos, weights) if not p.exists()]
    if missing:
        reason = (
            f"bench data not found: {', '.join(missing)} "
            "(set ML_BENCH_DATA to a folder with animals3/ and weights/)"
        )
        log.warning("animals3: SKIPPED: %s", reason)
        return Result(name="animals3", title="animals3 test accuracy, scratch vs transfer", skipped=reason)

    # Outside the repository: ingest hard-links or copies the photos into its work dir.
    tmp = Path(tempfile.mkdtemp(prefix="ml-bench-animals3-"))
    try:
        info = ingest(str(photos), tmp / "work", DataConfig())
        dataset_dir = Path(info["dataset_dir"])
        log.info("animals3: %d ok images, splits %s", info["n_ok"], info["extra"]["splits"])
        keras_home = tmp / "keras_home"
        (keras_home / "models").mkdir(parents=True)
        shutil.copyfile(weights, keras_home / "models" / WEIGHTS_FILE)
        runs = {
            "scratch_small": ("scratch_small", "none", None),
            "transfer_file": ("transfer_mobilenet", str(weights), None),
            "transfer_imagenet": ("transfer_mobilenet", "imagenet", keras_home),
            "transfer_random": ("transfer_mobilenet", "none", None),
        }
        results = {
            key: _run_child(key, candidate, w, home, dataset_dir, tmp, settings, weights)
            for key, (candidate, w, home) in runs.items()
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    scratch, transfer = results["scratch_small"], results["transfer_file"]
    win = transfer["test_accuracy"] - scratch["test_accuracy"]
    verdict = (
        f"transfer beats scratch by {win * 100:.1f} points"
        if win >= CLEAR_WIN
        else f"SUSPICIOUS: transfer beats scratch by only {win * 100:.1f} points (< {CLEAR_WIN * 100:.0f}): "
        "check preprocessing, BatchNorm mode and that the weights loaded"
    )
    log.info("animals3: %s", verdict)
    notes = [
        f"{key}: test accuracy {r['test_accuracy']:.3f} (val {r['val_accuracy'] or 0:.3f}, "
        f"{r['image_size']} px, {r['epochs_run']} epochs, weights {r['weights']}, "
        f"frozen phase {r['frozen_phase']})"
        for key, r in results.items()
    ]
    imagenet = results["transfer_imagenet"]
    notes.append(
        "weights='imagenet' via KERAS_HOME: max |w_cache - w_file| = "
        f"{imagenet['keras_cache_vs_file_max_abs_diff']:.1e} "
        f"over {imagenet['keras_cache_weight_arrays']} arrays"
    )
    notes.append(verdict)
    return Result(
        name="animals3",
        title=f"animals3 test acc (n={transfer['test_images']}): scratch vs mobilenet a{ALPHA} ImageNet",
        baseline=f"{scratch['test_accuracy']:.3f} acc",
        project=f"{transfer['test_accuracy']:.3f} acc",
        ratio=transfer["test_accuracy"] / max(scratch["test_accuracy"], 1e-9),
        ratio_meaning="transfer (ImageNet file) test accuracy / scratch_small test accuracy",
        notes=notes,
        details={
            "dataset_splits": info["extra"]["splits"],
            "n_ok": info["n_ok"],
            "n_quarantined": info["n_quarantined"],
            "verdict": verdict,
            "runs": results,
        },
    )


def _run_child(
    key: str,
    candidate: str,
    weights: str,
    keras_home: Path | None,
    dataset_dir: Path,
    tmp: Path,
    settings: Settings,
    weights_file: Path,
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_animals",
        "--dataset",
        str(dataset_dir),
        "--candidate",
        candidate,
        "--weights",
        weights,
        "--out",
        str(tmp / "candidates" / key),
        "--cache-root",
        str(tmp / "cache"),
        "--seed",
        str(settings.seed),
        "--compare-with",
        str(weights_file),
    ]
    if settings.quick:
        cmd.append("--quick")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    # Keras reads KERAS_HOME once, at import: hence a child process per setting.
    env.pop("KERAS_HOME", None)
    if keras_home is not None:
        env["KERAS_HOME"] = str(keras_home)
    started = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"animals3 child {key!r} failed (exit {proc.returncode}):\n{tail}")
    result = {"run": key, **json.loads(lines[-1].removeprefix(RESULT_PREFIX))}
    log.info(
        "animals3: %-17s test accuracy %.3f (val %.3f, %d epochs) in %.0f s",
        key,
        result["test_accuracy"],
        result["val_accuracy"] or 0.0,
        result["epochs_run"],
        time.perf_counter() - started,
    )
    return result


# --- child process ---------------------------------------------------------------------------------


def _child(args: argparse.Namespace) -> dict[str, Any]:
    from ml.config import TrainConfig
    from ml.evaluation.metrics import evaluate_predictions
    from ml.training.fit import train_candidate
    from ml.training.predict import predict_split

    options: dict[str, dict[str, Any]] = {
        "scratch_small": {"image_size": SCRATCH_SIZE, "epochs": 2 if args.quick else 15},
        # Defaults otherwise: augmentation on, so the frozen phase runs on the augmented bank, and
        # the default epochs (a head on the bank stops early anyway).
        "transfer_mobilenet": {"alpha": ALPHA, **({"epochs": 3} if args.quick else {})},
    }
    config = TrainConfig(
        candidates=(args.candidate,),
        image_size=TRANSFER_SIZE,
        batch_size=32,
        weights=args.weights,
        seed=args.seed,
        candidate_options={args.candidate: options[args.candidate]},
    )
    extra: dict[str, Any] = {}
    if args.weights == "imagenet":
        extra = _compare_keras_cache_with_file(args.compare_with)
    summary = train_candidate(args.dataset, args.candidate, args.out, config, cache_root=args.cache_root)
    y_true, probs, labels = predict_split(
        args.out / "model.keras", args.dataset, "test", cache_root=args.cache_root
    )
    metrics = evaluate_predictions(y_true, probs, labels)
    return {
        "candidate": args.candidate,
        "weights": args.weights if not args.weights.endswith(".h5") else f"file:{Path(args.weights).name}",
        "weights_id": summary.get("weights_id"),
        "image_size": summary["image_size"],
        "train_images": summary["train_images"],
        "epochs_run": summary["epochs_run"],
        "val_accuracy": summary.get("val_accuracy"),
        "test_images": metrics["n"],
        "test_accuracy": metrics["accuracy"],
        "test_log_loss": metrics["log_loss"],
        "test_macro_f1": metrics["macro_f1"],
        "chance_accuracy": metrics["chance_accuracy"],
        "recall": {label: round(v["recall"], 3) for label, v in metrics["per_class"].items()},
        "bottleneck": summary.get("bottleneck"),
        "frozen_phase": _frozen_phase(summary),
        "train_wall_time_s": summary.get("wall_time_s"),
        **extra,
    }


def _frozen_phase(summary: dict[str, Any]) -> str:
    """Which path trained a candidate's frozen phase: the bank, plain cached features, the backbone."""
    if summary.get("weights") is None:
        return "n/a (no frozen backbone)"
    bottleneck = summary.get("bottleneck")
    if not bottleneck:
        return "through the backbone"
    if bottleneck["source"] == "bank":
        return f"augmented bank, {bottleneck['bank_views']} views"
    return "cached features, no augmentation"


def _compare_keras_cache_with_file(weights_file: Path) -> dict[str, Any]:
    """Build the backbone both ways and compare every weight (proves which file Keras loaded)."""
    import numpy as np

    from ml.models.transfer import build_backbone
    from ml.models.weights import keras_models_dir

    cached = keras_models_dir() / WEIGHTS_FILE
    from_cache = build_backbone("mobilenet", TRANSFER_SIZE, alpha=ALPHA, weights="imagenet")
    from_file = build_backbone("mobilenet", TRANSFER_SIZE, alpha=ALPHA, weights=str(weights_file))
    diffs = [
        float(np.max(np.abs(a - b)))
        for a, b in zip(from_cache.get_weights(), from_file.get_weights(), strict=True)
    ]
    return {
        "keras_home": os.environ.get("KERAS_HOME"),
        "keras_cache_file_present": cached.is_file(),
        "keras_cache_vs_file_max_abs_diff": max(diffs),
        "keras_cache_weight_arrays": len(diffs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="animals3 benchmark child: train one candidate, score the test split"
    )
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--candidate", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache-root", type=Path, required=True)
    parser.add_argument(
        "--compare-with", type=Path, required=True, help="the weights file, for the imagenet check"
    )
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--quick", action="store_true")
    result = _child(parser.parse_args(argv))
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
