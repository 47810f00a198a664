"""Hyperparameter search as candidates: successive halving over trials, rung by rung.

The plan is a pure function of the config (`SearchConfig`): every task of any worker recomputes
the same trials from the same seed, so XCom carries only trial names. Trial ``<base>__t<NN>``
trains like any candidate, with its drawn settings as its ``candidate_options`` and the rung's
epoch target (`trial_train_config`)::

    rung 1: every trial to min_epochs            -> top 1/eta by search.metric (at least one) go on
    rung 2: survivors to min_epochs * eta, resuming from their rung-1 checkpoint in the store
    rung 3: ...                   to min_epochs * eta**2

A rung's cost is only its extra epochs (survivors resume), so the budget of n trials is
``sum_r n_r * (e_r - e_(r-1))`` with ``n_1 = n`` and ``n_(r+1) = max(1, n_r // eta)``
(`schedule_cost`); over `max_total_epochs`, the plan drops trials until it fits (`fit_budget`).

Nothing here imports TensorFlow; the stages that train are in `ml.pipeline` (``search_*``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ml.config import LOG_UNIFORM, TrainConfig
from ml.errors import ConfigError
from ml.models.registry import trial_name

if TYPE_CHECKING:
    from ml.config import PipelineConfig, SearchConfig

log = logging.getLogger(__name__)

SIGNIFICANT_DIGITS = 3  # drawn reals are rounded: readable in names, columns and logs (3e-3, not 0.0030172...)


@dataclass(frozen=True)
class Trial:
    """One drawn configuration of a base candidate."""

    name: str
    base: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """``learning_rate=0.003 dropout=0.2`` (sorted keys)."""
        return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(self.params.items()))


@dataclass(frozen=True)
class SearchPlan:
    """The trials of a run's search and its epoch schedule."""

    trials: tuple[Trial, ...]
    rung_epochs: tuple[int, ...]
    eta: int
    metric: str
    requested_trials: int
    note: str | None = None  # why fewer trials than requested (the budget)

    @property
    def rungs(self) -> int:
        return len(self.rung_epochs)

    def trial(self, name: str) -> Trial:
        """The trial called `name`; ConfigError naming the planned ones otherwise."""
        for trial in self.trials:
            if trial.name == name:
                return trial
        raise ConfigError(f"{name!r} is not a trial of this search; planned: {[t.name for t in self.trials]}")

    @property
    def cost(self) -> int:
        return schedule_cost(len(self.trials), self.rung_epochs, self.eta)


def _round(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def _draw(rng: random.Random, spec: Any) -> Any:
    if isinstance(spec, Mapping):
        low, high = spec[LOG_UNIFORM]
        return _round(math.exp(rng.uniform(math.log(low), math.log(high))))
    return spec[rng.randrange(len(spec))]


def sample_trials(search: SearchConfig, n: int | None = None) -> list[Trial]:
    """`n` (default ``search.max_trials``) trials, drawn reproducibly from ``search.seed``.

    Trial i uses base ``bases[(i - 1) % len(bases)]`` and draws every space key in sorted order, so a
    seed always gives the same trials, and a smaller `n` gives a prefix of a larger one.
    """
    rng = random.Random(search.seed)
    count = search.max_trials if n is None else n
    trials = []
    for i in range(count):
        base = search.bases[i % len(search.bases)]
        params = {key: _draw(rng, search.space[key]) for key in sorted(search.space)}
        trials.append(Trial(trial_name(base, i + 1), base, params))
    return trials


def survivor_count(entrants: int, eta: int) -> int:
    """How many of `entrants` go on to the next rung: the top 1/eta, at least one."""
    return max(1, entrants // eta) if entrants else 0


def rung_sizes(n: int, rungs: int, eta: int) -> list[int]:
    """Trials in each rung when `n` start."""
    sizes = [n]
    for _ in range(rungs - 1):
        sizes.append(survivor_count(sizes[-1], eta))
    return sizes


def schedule_cost(n: int, rung_epochs: Sequence[int], eta: int) -> int:
    """Epochs trained by the whole search with `n` trials (each survivor trains only its extra epochs)."""
    previous, total = 0, 0
    for size, epochs in zip(rung_sizes(n, len(rung_epochs), eta), rung_epochs, strict=True):
        total += size * (epochs - previous)
        previous = epochs
    return total


def fit_budget(search: SearchConfig) -> tuple[int, str | None]:
    """(trials to run, a note when that is fewer than ``max_trials`` because of ``max_total_epochs``)."""
    n, epochs = search.max_trials, search.rung_epochs
    if search.max_total_epochs is None or schedule_cost(n, epochs, search.eta) <= search.max_total_epochs:
        return n, None
    wanted = schedule_cost(n, epochs, search.eta)
    while n > 1 and schedule_cost(n, epochs, search.eta) > search.max_total_epochs:
        n -= 1
    # SearchConfig refuses a budget below one trial's schedule, so n = 1 always fits here.
    note = (f"search.max_total_epochs {search.max_total_epochs} is below the {wanted} epochs of "
            f"{search.max_trials} trials (rungs {list(epochs)}, eta {search.eta}): running {n} trials "
            f"({schedule_cost(n, epochs, search.eta)} epochs)")
    return n, note


def plan_search(search: SearchConfig) -> SearchPlan:
    """The run's trials (none when the search is off) and their schedule."""
    if not search.enabled:
        return SearchPlan((), search.rung_epochs, search.eta, search.metric, 0)
    n, note = fit_budget(search)
    return SearchPlan(tuple(sample_trials(search, n)), search.rung_epochs, search.eta, search.metric,
                      search.max_trials, note)


def trial_train_config(train: TrainConfig, trial: Trial, epochs: int) -> TrainConfig:
    """`train` with the trial's settings (over its base's own options) and `epochs` as its candidate options."""
    options = {**train.options_for(trial.base), **trial.params, "epochs": epochs}
    return dataclasses.replace(train, candidate_options={**train.candidate_options, trial.name: options})


def check_search(config: PipelineConfig) -> None:
    """Every choice (and both ends of every range) is a valid setting of every base, by the rules training uses.

    Raises:
        ConfigError: naming ``search.space.<key>`` and the base.
    """
    from ml.training.settings import CandidateSettings

    search = config.search
    epochs = search.rung_epochs[-1]
    for base in search.bases:
        values: dict[str, list[Any]] = {k: list(v[LOG_UNIFORM]) if isinstance(v, Mapping) else list(v)
                                        for k, v in search.space.items()}
        probes = [{}] + [{key: value} for key, choices in values.items() for value in choices]
        for params in probes:
            trial = Trial(trial_name(base, 1), base, params)
            try:
                settings = CandidateSettings.for_candidate(trial_train_config(config.train, trial, epochs), trial.name)
                for key, value in (settings.scratch_options or {}).items():
                    # Checked by the builder only, i.e. after the rung's data is loaded: check them now.
                    if key in ("dropout", "head_dropout") and not 0 <= float(value) < 1:
                        raise ConfigError(f"{key} must be in [0, 1), got {value!r}")
                    if key in ("depth", "width") and not (isinstance(value, int) and value >= 1):
                        raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
            except ConfigError as exc:
                where = f"search.space.{next(iter(params))}" if params else "search.bases"
                raise ConfigError(f"{where}: {base} {trial.describe()}: {exc}") from None


def _score(result: Mapping[str, Any], metric: str) -> float | None:
    value = result.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def rank_results(results: Sequence[Mapping[str, Any]], metric: str) -> list[Mapping[str, Any]]:
    """Best first by `metric` (val_accuracy higher, val_loss lower); ties by the other metric, then by name.

    A result without a finite `metric` goes last.
    """
    other = "val_loss" if metric == "val_accuracy" else "val_accuracy"

    def key(result: Mapping[str, Any]) -> tuple[Any, ...]:
        def oriented(name: str) -> float:
            score = _score(result, name)
            if score is None:
                return math.inf
            return -score if name == "val_accuracy" else score

        return (_score(result, metric) is None, oriented(metric), oriented(other), str(result["trial"]))

    return sorted(results, key=key)


def select_survivors(results: Sequence[Mapping[str, Any]], metric: str, eta: int) -> list[str]:
    """Names of the top 1/eta (at least one) of a rung's results (each {trial, val_accuracy, val_loss})."""
    ranked = rank_results(results, metric)
    return [str(r["trial"]) for r in ranked[: survivor_count(len(ranked), eta)]]


def search_info(trial: Trial, rung: int, plan: SearchPlan) -> dict[str, Any]:
    """What a trial's train summary (and so the leaderboard) records about it."""
    return {"trial": trial.name, "base": trial.base, "params": dict(trial.params), "rung": rung,
            "rungs": plan.rungs, "epochs": plan.rung_epochs[rung - 1], "eta": plan.eta, "metric": plan.metric}


def is_eliminated(summary: Mapping[str, Any]) -> bool:
    """Whether a train summary is of a trial that stopped before the last rung."""
    info = summary.get("search")
    return isinstance(info, Mapping) and int(info.get("rung", 0)) < int(info.get("rungs", 0))


def describe_search(info: Mapping[str, Any]) -> str:
    """``rung 1/2: learning_rate=0.003 dropout=0.2`` for tables."""
    params = Trial(str(info.get("trial", "")), str(info.get("base", "")), dict(info.get("params") or {}))
    return f"rung {info.get('rung')}/{info.get('rungs')}: {params.describe()}".rstrip(": ")
