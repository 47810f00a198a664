"""Hyperparameter search: config validation, reproducible trials, the rung schedule, survivors, names."""

from __future__ import annotations

from typing import Any

import pytest

from ml.config import PipelineConfig, SearchConfig
from ml.errors import ConfigError
from ml.training.search import (
    fit_budget,
    plan_search,
    rung_sizes,
    sample_trials,
    schedule_cost,
    select_survivors,
    trial_train_config,
)

SPACE = {"learning_rate": {"log_uniform": [3e-4, 1e-2]}, "dropout": [0.1, 0.2, 0.3]}


def _search(**kwargs: Any) -> SearchConfig:
    return SearchConfig(**{"enabled": True, "bases": ["scratch_small"], "space": SPACE, **kwargs})


def _pipeline(**search: Any) -> PipelineConfig:
    return PipelineConfig.from_dict({"search": {"enabled": True, "bases": ["scratch_small"], "space": SPACE,
                                                **search}})


# --------------------------------------------------------------------------- config


def test_search_is_off_by_default_and_plans_no_trial() -> None:
    config = PipelineConfig.load()

    assert config.search.enabled is False
    assert plan_search(config.search).trials == ()


@pytest.mark.parametrize(("search", "match"), [
    ({"bases": []}, "search.bases must name at least one"),
    ({"bases": ["scratch_nope"]}, "search.bases"),
    ({"bases": ["ensemble_top2"]}, "search.bases: 'ensemble_top2' cannot be searched"),
    ({"bases": ["scratch_small__t01"]}, "cannot be searched"),
    ({"eta": 1}, r"search.eta must be in \[2, 10\]"),
    ({"rungs": 4}, r"search.rungs must be in \[1, 3\]"),
    ({"rungs": 0}, r"search.rungs must be in \[1, 3\]"),
    ({"min_epochs": 0}, "search.min_epochs"),
    ({"max_trials": 100}, "search.max_trials"),
    ({"metric": "accuracy"}, "search.metric must be one of"),
    ({"min_epochs": 300, "eta": 2, "rungs": 3}, "the last rung would train 1200 epochs"),
    ({"max_total_epochs": 3, "min_epochs": 2, "rungs": 2}, "below one trial's schedule through all 2 rungs"),
    ({"space": {"head_units": [0, 64]}}, "search.space.head_units: scratch_small has no setting 'head_units'"),
    ({"space": {"epochs": [1, 2]}}, "search.space.epochs"),
    ({"space": {"dropout": []}}, "search.space.dropout must be a non-empty list"),
    ({"space": {"dropout": [0.1, 0.1]}}, "duplicate choices"),
    ({"space": {"image_size": {"log_uniform": [32, 64]}}}, "needs a real-valued setting"),
    ({"space": {"learning_rate": {"log_uniform": [0.01, 0.001]}}}, "0 < low < high"),
    ({"space": {"learning_rate": {"uniform": [0.001, 0.01]}}}, "must be a list of choices or"),
])
def test_bad_search_settings_are_refused_naming_the_setting(search: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _pipeline(**search)


@pytest.mark.parametrize(("bases", "space", "match"), [
    (["scratch_small"], {"learning_rate": [0.5, 2.0]}, r"search.space.learning_rate: scratch_small .*learning_rate"),
    (["scratch_small"], {"dropout": [0.2, 1.5]}, r"search.space.dropout: scratch_small dropout=1.5"),
    (["transfer_mobilenet"], {"alpha": [0.25, 3.0]}, r"search.space.alpha: transfer_mobilenet alpha=3"),
    (["transfer_inception_v3"], {"image_size": [64, 96]}, r"search.space.image_size: .*needs image_size >= 75"),
    # alpha is a MobileNet setting: a base without it is named with what it allows.
    (["transfer_mobilenet", "transfer_resnet50_v2"], {"alpha": [0.25]}, r"transfer_resnet50_v2 has no setting"),
])
def test_choices_are_checked_by_the_rules_the_base_trains_with(bases: list[str], space: dict[str, Any],
                                                               match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _pipeline(bases=bases, space=space)


def test_a_search_of_two_bases_over_shared_keys_is_accepted() -> None:
    config = _pipeline(bases=["scratch_small", "transfer_mobilenet"],
                       space={"learning_rate": {"log_uniform": [1e-3, 1e-2]}, "dropout": [0.1, 0.3]})

    names = [t.name for t in plan_search(config.search).trials]
    assert names[:4] == ["scratch_small__t01", "transfer_mobilenet__t02", "scratch_small__t03",
                         "transfer_mobilenet__t04"]


def test_trial_names_are_reserved_for_the_search() -> None:
    with pytest.raises(ConfigError, match="is a search trial's name"):
        PipelineConfig.from_dict({"train": {"candidates": ["scratch_small__t01"]}})


def test_the_config_file_documents_the_block_off() -> None:
    import yaml

    from ml.config import DEFAULT_CONFIG_FILE

    raw = yaml.safe_load(DEFAULT_CONFIG_FILE.read_text())
    assert raw["search"]["enabled"] is False
    assert PipelineConfig.from_dict({"search": {**raw["search"], "enabled": True}}).search.enabled


# --------------------------------------------------------------------------- trials


def test_trials_are_drawn_reproducibly_from_the_seed() -> None:
    a, b = sample_trials(_search(seed=3)), sample_trials(_search(seed=3))
    other = sample_trials(_search(seed=4))

    assert a == b
    assert [t.params for t in a] != [t.params for t in other]
    assert sample_trials(_search(seed=3), 3) == a[:3], "fewer trials are a prefix of more"
    for trial in a:
        assert 3e-4 <= trial.params["learning_rate"] <= 1e-2
        assert trial.params["dropout"] in (0.1, 0.2, 0.3)
    assert len({t.params["learning_rate"] for t in a}) > 1


def test_log_uniform_draws_spread_over_the_decades() -> None:
    trials = sample_trials(_search(max_trials=99, space={"learning_rate": {"log_uniform": [1e-4, 1e-1]}}))
    rates = [t.params["learning_rate"] for t in trials]

    # Log-uniform: about a third per decade (uniform would put ~90% in the top decade).
    assert sum(r < 1e-3 for r in rates) >= 20 and sum(r < 1e-2 for r in rates) <= 80


def test_trials_are_named_after_their_base_and_number() -> None:
    from ml.models.registry import parse_candidate, trial_base
    from ml.registry.layout import candidate_prefix, check_candidate

    names = [t.name for t in sample_trials(_search(max_trials=12))]

    assert names[0] == "scratch_small__t01" and names[-1] == "scratch_small__t12"
    assert parse_candidate("scratch_small__t07") == ("scratch", "small")
    assert parse_candidate("transfer_mobilenet_v2__t10") == ("transfer", "mobilenet_v2")
    assert trial_base("transfer_mobilenet_v2__t10") == "transfer_mobilenet_v2"
    assert check_candidate("scratch_small__t03") == "scratch_small__t03"
    assert candidate_prefix("m", "run", "scratch_small__t03").endswith("/scratch_small__t03/")
    from ml.errors import UnknownArchitectureError

    for bad in ("scratch_small__t00", "scratch_small__t1", "scratch_small__t001", "finetune_mobilenet__t01",
                "ensemble_top2__t01", "scratch_small__t01__t02", "scratch_nope__t01"):
        with pytest.raises(UnknownArchitectureError):
            parse_candidate(bad)


def test_a_trial_trains_with_its_settings_over_its_base_options_and_the_rung_epochs() -> None:
    from ml.training.settings import CandidateSettings

    config = PipelineConfig.from_dict({
        "train": {"candidate_options": {"scratch_small": {"width": 8, "dropout": 0.4}}},
        "search": {"enabled": True, "bases": ["scratch_small"], "space": {"dropout": [0.1], "learning_rate": [0.004]}},
    })
    trial = plan_search(config.search).trials[0]

    settings = CandidateSettings.for_candidate(trial_train_config(config.train, trial, 4), trial.name)

    assert settings.epochs == 4 and settings.learning_rate == 0.004
    assert settings.scratch_options["dropout"] == 0.1 and settings.scratch_options["width"] == 8


# --------------------------------------------------------------------------- schedule and budget


@pytest.mark.parametrize(("eta", "rungs", "min_epochs", "epochs"), [
    (2, 1, 3, (3,)), (2, 2, 2, (2, 4)), (3, 3, 1, (1, 3, 9)), (2, 3, 2, (2, 4, 8)),
])
def test_rung_r_trains_to_min_epochs_times_eta_to_the_r_minus_1(eta: int, rungs: int, min_epochs: int,
                                                                epochs: tuple[int, ...]) -> None:
    assert _search(eta=eta, rungs=rungs, min_epochs=min_epochs).rung_epochs == epochs


def test_rung_sizes_and_cost_count_only_the_extra_epochs_of_survivors() -> None:
    assert rung_sizes(8, 3, 2) == [8, 4, 2]
    assert rung_sizes(5, 3, 3) == [5, 1, 1]
    # 8 trials x 2 epochs + 4 survivors x (4 - 2) + 2 x (8 - 4)
    assert schedule_cost(8, (2, 4, 8), 2) == 16 + 8 + 8
    assert schedule_cost(1, (2, 4), 2) == 4


def test_over_budget_the_plan_shrinks_to_fit_and_says_so() -> None:
    search = _search(max_trials=8, rungs=2, min_epochs=2, max_total_epochs=15)

    n, note = fit_budget(search)
    plan = plan_search(search)

    assert n == 5 and schedule_cost(5, (2, 4), 2) <= 15 < schedule_cost(6, (2, 4), 2)
    assert "max_total_epochs 15 is below the 24 epochs of 8 trials" in note and "running 5 trials" in note
    assert len(plan.trials) == 5 and plan.note == note and plan.cost <= 15
    assert fit_budget(_search(max_trials=8, max_total_epochs=24)) == (8, None)


# --------------------------------------------------------------------------- survivors


def _r(trial: str, acc: float | None, loss: float | None) -> dict[str, Any]:
    return {"trial": trial, "val_accuracy": acc, "val_loss": loss}


def test_survivors_are_the_top_1_over_eta_by_the_metric() -> None:
    results = [_r("a__t01", 0.5, 1.0), _r("a__t02", 0.9, 0.4), _r("a__t03", 0.7, 0.2), _r("a__t04", 0.6, 0.9)]

    assert select_survivors(results, "val_accuracy", 2) == ["a__t02", "a__t03"]
    assert select_survivors(results, "val_loss", 2) == ["a__t03", "a__t02"]
    assert select_survivors(results, "val_accuracy", 3) == ["a__t02"]
    assert select_survivors(results, "val_accuracy", 10) == ["a__t02"], "at least one goes on"
    assert select_survivors([], "val_accuracy", 2) == []


def test_ties_are_broken_by_the_other_metric_then_by_name() -> None:
    results = [_r("a__t03", 0.8, 0.5), _r("a__t01", 0.8, 0.5), _r("a__t02", 0.8, 0.3), _r("a__t04", 0.1, 2.0)]

    assert select_survivors(results, "val_accuracy", 2) == ["a__t02", "a__t01"]
    assert select_survivors(list(reversed(results)), "val_accuracy", 2) == ["a__t02", "a__t01"]


def test_a_trial_without_a_score_goes_last() -> None:
    results = [_r("a__t01", None, None), _r("a__t02", 0.2, float("nan")), _r("a__t03", 0.1, 1.0)]

    assert select_survivors(results, "val_loss", 2) == ["a__t03"]
    assert select_survivors(results, "val_accuracy", 1)[0] == "a__t02"
