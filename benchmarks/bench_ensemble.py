"""Single-image CPU latency of an ensemble vs its members (the leaderboard's latency_ms measure).

Members: ``scratch_small`` and ``transfer_mobilenet`` (alpha 0.25, random weights: latency does not
depend on the weights' values) at 96 px, 5 classes, and ``ensemble_top2`` of the two, all timed in
one process, interleaved over `--rounds` rounds; the report is the median per model and the ratio
ensemble / (sum of members). Run: ``python -m benchmarks.bench_ensemble``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import numpy as np

    from ml.evaluation.report import measure_latency_ms
    from ml.models import load_model
    from ml.models.ensemble import build_ensemble
    from ml.models.scratch import build_scratch
    from ml.models.transfer import build_transfer

    size = args.image_size
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"scratch_small": Path(tmp) / "a.keras", "transfer_mobilenet": Path(tmp) / "b.keras"}
        build_scratch("small", 5, size).save(paths["scratch_small"])
        build_transfer("mobilenet", 5, size, options={"alpha": 0.25}, weights=None).save(paths["transfer_mobilenet"])
        models = {name: load_model(path) for name, path in paths.items()}
        ensemble = build_ensemble(list(models.values()), [0.5, 0.5], names=list(models), name="ensemble_top2")
        ensemble.save(Path(tmp) / "e.keras")
        models["ensemble_top2"] = load_model(Path(tmp) / "e.keras")
        example = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype("float32")
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, model in models.items():
                times[name].append(measure_latency_ms(lambda x, m=model: m(x, training=False), example))
    median = {name: round(statistics.median(values), 2) for name, values in times.items()}
    members = median["scratch_small"] + median["transfer_mobilenet"]
    print(json.dumps({"image_size": size, "rounds": args.rounds, "latency_ms": median,
                      "ensemble_over_sum_of_members": round(median["ensemble_top2"] / members, 2)}))


if __name__ == "__main__":
    main()
