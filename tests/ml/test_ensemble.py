"""ensemble_top<k>: names and config, member choice and weights, the one-model average, export, pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ml.config import PipelineConfig, TrainConfig
from ml.errors import ConfigError, DataError
from ml.models.registry import candidate_choices, ensemble_size, parse_candidate
from ml.training.ensemble import MemberScore, choose_members, member_weights

IMAGE_SIZE = 32


def _score(name: str, accuracy: float, log_loss: float) -> MemberScore:
    return MemberScore(name, Path("/nowhere"), np.zeros(1), np.zeros((1, 3)),
                       {"accuracy": accuracy, "log_loss": log_loss})


# -- names and config -------------------------------------------------------------------------------


def test_ensemble_names_are_candidates():
    assert parse_candidate("ensemble_top3") == ("ensemble", "top3")
    assert ensemble_size("ensemble_top8") == 8
    assert "ensemble_top2" in candidate_choices() and "ensemble_top9" not in candidate_choices()
    config = TrainConfig(candidates=("scratch_small", "transfer_mobilenet_v2", "ensemble_top3"), finetune_top_k=1)
    assert config.trained_candidates == ("scratch_small", "transfer_mobilenet_v2")
    assert config.ensembles == ("ensemble_top3",)


@pytest.mark.parametrize(("candidates", "options", "message"), [
    (("scratch_small", "scratch_tiny", "ensemble_top9"), {}, r"k in \[2, 8\] members, got k=9"),
    (("scratch_small", "scratch_tiny", "ensemble_top1"), {}, r"k in \[2, 8\] members, got k=1"),
    (("scratch_small", "scratch_tiny", "ensemble_top3"), {}, "averages 3 members but this config trains only 2"),
    (("scratch_small", "scratch_tiny", "ensemble_topx"), {}, "unknown candidate 'ensemble_topx'"),
    (("scratch_small", "scratch_tiny", "ensemble_top02"), {}, "unknown candidate 'ensemble_top02'"),
    (("scratch_small", "scratch_tiny", "ensemble_top2"), {"ensemble_top2": {"weighting": "max"}},
     r"ensemble_top2.weighting must be one of \['uniform', 'inverse_log_loss'\], got 'max'"),
    (("scratch_small", "scratch_tiny", "ensemble_top2"), {"ensemble_top2": {"alpha": 1}}, "unknown option"),
])
def test_bad_ensembles_are_config_errors(candidates, options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(candidates=candidates, candidate_options=options, finetune_top_k=0)


def test_fine_tuned_candidates_count_as_members():
    TrainConfig(candidates=("scratch_small", "transfer_mobilenet_v2", "ensemble_top3"), finetune_top_k=1)
    with pytest.raises(ConfigError, match="averages 3 members"):
        TrainConfig(candidates=("scratch_small", "transfer_mobilenet_v2", "ensemble_top3"), finetune_top_k=0)


# -- member choice and weights ------------------------------------------------------------------------


def test_k_best_on_validation_by_the_gate_metric():
    scored = [_score("a", 0.6, 0.9), _score("b", 0.8, 1.2), _score("c", 0.7, 0.5), _score("d", 0.8, 1.0)]

    by_accuracy = [m.candidate for m in choose_members(scored, 3, "accuracy")]
    by_log_loss = [m.candidate for m in choose_members(scored, 2, "log_loss")]

    assert by_accuracy == ["b", "d", "c"]  # ties by name
    assert by_log_loss == ["c", "a"]  # lower is better
    with pytest.raises(DataError, match="needs 5 trained candidates, this run has 4"):
        choose_members(scored, 5, "accuracy")


def test_weights():
    assert member_weights([0.5, 2.0, 1.0], "uniform") == pytest.approx([1 / 3] * 3)
    assert member_weights([0.5, 1.0], "inverse_log_loss") == pytest.approx([2 / 3, 1 / 3])
    assert sum(member_weights([0.0, 1.0], "inverse_log_loss")) == pytest.approx(1.0)


# -- the model ----------------------------------------------------------------------------------------


def _member(folder: Path, variant: str, labels: list[str], seed: int) -> Path:
    import keras

    from ml.io import write_json
    from ml.models.scratch import build_scratch

    keras.utils.set_random_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_scratch(variant, len(labels), IMAGE_SIZE)
    model.save(folder / "model.keras")
    write_json(folder / "labels.json", labels)
    write_json(folder / "preprocessing.json", {"image_size": IMAGE_SIZE, "color_order": "RGB",
                                               "input_range": [0, 255], "preprocess": "tf"})
    write_json(folder / "train_summary.json", {"candidate": folder.name, "params": int(model.count_params()),
                                               "wall_time_s": 10.0 + seed, "image_size": IMAGE_SIZE,
                                               "peak_rss_mb": 100.0})
    return folder


def test_one_model_averages_members_and_exports(tmp_path):
    from ml.models import load_model
    from ml.models.ensemble import build_ensemble
    from ml.registry.exports import build_exports, verify_exports

    labels = ["a", "b", "c"]
    paths = [_member(tmp_path / name, variant, labels, seed) / "model.keras"
             for name, variant, seed in (("scratch_tiny", "tiny", 1), ("scratch_small", "small", 2))]
    members = [load_model(p) for p in paths]
    model = build_ensemble(members, [0.3, 0.7], names=["scratch_tiny", "scratch_small"], name="ensemble_top2")
    model.save(tmp_path / "model.keras")
    (tmp_path / "labels.json").write_text('["a", "b", "c"]')
    images = np.random.default_rng(0).integers(0, 256, (6, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    x = images.astype("float32")

    reloaded = load_model(tmp_path / "model.keras")
    expected = 0.3 * members[0](x, training=False).numpy() + 0.7 * members[1](x, training=False).numpy()

    np.testing.assert_allclose(reloaded(x, training=False).numpy(), expected, atol=1e-5)
    assert reloaded.count_params() == sum(m.count_params() for m in members)
    exports = build_exports(tmp_path / "model.keras", tmp_path / "exports", golden_images=images)
    checked = verify_exports(exports, model_path=tmp_path / "model.keras")["checked"]
    assert {"saved_model.zip", "model.tflite"} <= set(checked)
    assert all(entry["ok"] for entry in checked.values())


def test_members_of_different_sizes_are_refused(tmp_path):
    from ml.models.ensemble import build_ensemble
    from ml.models.scratch import build_scratch

    with pytest.raises(DataError, match="different image sizes"):
        build_ensemble([build_scratch("tiny", 3, 32), build_scratch("tiny", 3, 48)], [0.5, 0.5], names=["x", "y"])


# -- through the stages -------------------------------------------------------------------------------


def test_evaluate_stage_builds_scores_and_ranks_the_ensemble(tmp_path, tiny_dataset):
    from ml.io import read_json
    from ml.pipeline import evaluate_stage
    from ml.registry.runs import local_run_dir

    config = PipelineConfig.from_dict({
        "work_dir": str(tmp_path / "work"),
        "train": {"candidates": ["scratch_tiny", "scratch_small", "scratch_residual", "ensemble_top2"],
                  "image_size": IMAGE_SIZE, "finetune_top_k": 0,
                  "candidate_options": {"ensemble_top2": {"weighting": "inverse_log_loss"}}}})
    run_dir = local_run_dir(config, "run1")
    labels = read_json(tiny_dataset / "dataset.json")["labels"]
    summaries = [read_json(_member(run_dir / f"scratch_{v}", v, labels, seed) / "train_summary.json")
                 for seed, v in enumerate(("tiny", "small", "residual"))]

    evaluation = evaluate_stage(tiny_dataset, summaries, config, None, "run1")

    rows = {row["candidate"]: row for row in evaluation["leaderboard"]}
    assert "ensemble_top2" in rows and rows["ensemble_top2"]["rank"] is not None
    folder = run_dir / "ensemble_top2"
    members = read_json(folder / "members.json")
    # The two best on validation (the gate's metric, accuracy), weighted by 1 / validation log loss.
    from ml.training.ensemble import score_members

    scored = score_members(tiny_dataset, {s["candidate"]: run_dir / s["candidate"] for s in summaries},
                           cache_root=config.work_dir / "cache")
    best = [m.candidate for m in choose_members(scored, 2, "accuracy")]
    assert [m["candidate"] for m in members] == best
    inverse = [1 / m["val_log_loss"] for m in members]
    assert [m["weight"] for m in members] == pytest.approx([v / sum(inverse) for v in inverse])
    # Cost columns are the members' sums; the test predictions are the weighted members' mean.
    chosen = [s for s in summaries if s["candidate"] in best]
    assert rows["ensemble_top2"]["params"] == sum(s["params"] for s in chosen)
    assert rows["ensemble_top2"]["train_wall_time_s"] == pytest.approx(sum(s["wall_time_s"] for s in chosen))
    probs = {name: np.load(run_dir / name / "predictions.npz")["probs"] for name in (*best, "ensemble_top2")}
    mixed = sum(m["weight"] * probs[m["candidate"]] for m in members)
    np.testing.assert_allclose(probs["ensemble_top2"], mixed, atol=1e-5)
    assert read_json(folder / "preprocessing.json")["image_size"] == IMAGE_SIZE


def test_a_trained_ensemble_passes_the_gate_and_ships_verified_exports(tmp_path, tiny_dataset, store):
    from ml.pipeline import decide, evaluate_stage, train_stage
    from ml.registry import layout
    from ml.registry.packaging import publish_challenger

    config = PipelineConfig.from_dict({
        "work_dir": str(tmp_path / "work"), "storage": {"bucket": store.bucket},
        # 24 training images do not teach much: the floor over chance is lowered, every other check stays.
        "gate": {"min_gain_over_chance": 0.0},
        "train": {"candidates": ["scratch_tiny", "scratch_small", "ensemble_top2"], "image_size": IMAGE_SIZE,
                  "epochs": 3, "finetune_top_k": 0, "augment": False}})
    results = [train_stage(tiny_dataset, name, config, store, "run2") for name in config.train.trained_candidates]

    evaluation = evaluate_stage(tiny_dataset, results, config, store, "run2")
    decision = decide(tiny_dataset, "ensemble_top2", None, config, store, "run2")

    assert "ensemble_top2" in {row["candidate"] for row in evaluation["leaderboard"]}
    assert decision["promote"], decision["reasons"]
    dataset = {"dataset_hash": "0" * 64, "source": str(tiny_dataset)}
    publish_challenger("v-ensemble", dataset, tiny_dataset, evaluation, decision, config, store, "run2", quality=None)
    keys = set(store.list_keys(layout.version_prefix(config.storage.model_name, "v-ensemble")))
    for name in ("model.keras", "saved_model.zip", "model.tflite", "golden.npz", "COMPLETE"):
        assert layout.version_key(config.storage.model_name, "v-ensemble", name) in keys, name


def test_ensemble_names_are_checked_before_keys_are_built():
    from ml.errors import UnsafeNameError
    from ml.registry import layout

    assert layout.candidate_prefix("m", "r", "ensemble_top3").endswith("/ensemble_top3/")
    with pytest.raises(UnsafeNameError):
        layout.check_candidate("ensemble_top3/../../victim")
    with pytest.raises(ConfigError, match="got k=12"):
        layout.check_candidate("ensemble_top12")
