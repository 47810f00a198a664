"""A consumer's smoke test: load the production model and check it predicts sensibly."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ml.errors import ModelVerificationError

log = logging.getLogger(__name__)


def smoke_test(predictor: Any, dataset_dir: Path, *, n_images: int = 32, min_gain_over_chance: float = 0.0) -> dict:
    """Predict up to `n_images` held-out (test split) images and fail loudly on garbage.

    Garbage means: probabilities that are not finite or do not sum to 1, or top-1 accuracy not
    above chance (1 / number of classes) by `min_gain_over_chance`.
    """
    import numpy as np
    import pandas as pd

    manifest = pd.read_parquet(Path(dataset_dir) / "manifest.parquet")
    test = manifest[(manifest["status"] == "ok") & (manifest["split"] == "test")]
    test = test[test["label"].isin(predictor.labels)].sort_values("sha256").head(n_images)
    if test.empty:
        raise ModelVerificationError(f"no held-out test images with known labels in {dataset_dir}")
    probs = predictor.predict_proba([Path(dataset_dir) / p for p in test["path"]])
    if not np.all(np.isfinite(probs)) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ModelVerificationError(f"model {predictor.version} returned invalid probabilities")
    index = {label: i for i, label in enumerate(predictor.labels)}
    truth = test["label"].map(index).to_numpy()
    accuracy = float((probs.argmax(axis=1) == truth).mean())
    chance = 1.0 / len(predictor.labels)
    result = {"version": predictor.version, "images": len(test), "accuracy": accuracy, "chance": chance}
    log.info("smoke test of %s: accuracy %.3f on %d held-out images (chance %.3f)",
             predictor.version, accuracy, len(test), chance)
    if accuracy <= chance + min_gain_over_chance:
        raise ModelVerificationError(
            f"model {predictor.version} predicts garbage: accuracy {accuracy:.3f} on {len(test)} held-out "
            f"images is not above chance {chance:.3f} + {min_gain_over_chance:.3f}")
    return result
