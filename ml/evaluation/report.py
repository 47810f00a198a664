"""Latency and size measurements, and the per-run report (report.json + report.html).

The run report is what a person opens after a run: the dataset, the quality results, the
leaderboard, the production model's score on the same split, and the gate's decision with
its reasons. Candidate figures are linked by path relative to the run folder
(``<candidate>/curves.png``), which matches the object-store layout
``<model_name>/runs/<run_id>/<candidate>/...`` next to ``runs/<run_id>/report.json``.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from ml.errors import ConfigError, DataError
from ml.evaluation.confusions import confusion_section
from ml.evaluation.html import esc, html_page, num, pct
from ml.evaluation.leaderboard import best_candidate, leaderboard_html_table, production_row
from ml.io import to_jsonable, write_atomic

log = logging.getLogger(__name__)

CANDIDATE_IMAGES = {"curves": "curves.png", "confusion": "confusion.png"}
# Config keys that look like credentials are never written into a report (invariant 4).
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|api_?key|access_?key|credential)", re.IGNORECASE)
_REDACTED = "***"


def measure_latency_ms(
    predict_fn: Callable[[np.ndarray], Any],
    example: np.ndarray,
    *,
    repeats: int = 20,
    warmup: int = 3,
) -> float:
    """Median wall time in ms of `predict_fn` on one image.

    Args:
        predict_fn: called with a batch of one, e.g. ``Predictor.predict_proba`` (the serving path,
            what the leaderboard reports); an eager ``model(x)`` measures Python overhead, not the
            model (147 ms vs 12 ms compiled for MobileNet v1 0.25 at 224 px).
        example: one image (H, W, C) or a batch of one (1, H, W, C).
        repeats: timed calls; the median resists the odd scheduler hiccup on a shared worker.
        warmup: untimed calls first, so graph tracing and memory allocation are not counted.
    """
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"latency needs repeats >= 1 and warmup >= 0, "
                          f"got repeats={repeats}, warmup={warmup}")
    batch = np.asarray(example)
    if batch.ndim == 3:
        batch = batch[None, ...]
    if batch.ndim != 4 or batch.shape[0] != 1:
        raise DataError("latency example must be one image (H, W, C) or a batch of one, "
                        f"got shape {batch.shape}")
    for _ in range(warmup):
        _materialise(predict_fn(batch))
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        _materialise(predict_fn(batch))
        timings.append((time.perf_counter() - start) * 1000.0)
    median = float(statistics.median(timings))
    log.info("latency: median %.2f ms over %d runs (min %.2f, max %.2f)",
             median, repeats, min(timings), max(timings))
    return median


def _materialise(output: Any) -> None:
    # Eager tensors may compute lazily on some backends: pull the values so they are timed.
    if hasattr(output, "numpy"):
        output.numpy()
    elif isinstance(output, (list, tuple)):
        for item in output:
            _materialise(item)


def model_size_bytes(path: str | Path) -> int:
    """Bytes on disk of a model file, or of all files under a model directory (SavedModel)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    raise DataError(f"model path {path} does not exist")


def redact(config: Any) -> Any:
    """A copy of a nested config with credential-looking keys' values replaced by '***'."""
    if isinstance(config, Mapping):
        return {k: (_REDACTED if _SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v))
                for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [redact(v) for v in config]
    return config


def relative_link(link: str) -> str | None:
    """`link` percent-encoded for an href/src, or None unless it is a plain relative path.

    The report sits in the run folder and links only inside it: no scheme (``https:``,
    ``javascript:``, ``data:``), no host (``//cdn``, ``\\\\host``), no absolute path, no ``.``/``..``
    segment, no control character. ``:``, ``?``, ``#`` and ``%`` inside names are percent-encoded,
    so they stay part of the file name.
    """
    parts = link.split("/")
    if not link or "\\" in link or link.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return None
    if ":" in parts[0] or any(ord(c) < 0x20 or c == "\x7f" for c in link):
        return None
    return quote(link, safe="/")


def _candidate_images(row: Mapping[str, Any]) -> dict[str, str]:
    """Relative links to a candidate's figures; a row may override them with ``images``."""
    if str(row.get("status", "ok")) == "failed":
        return {}
    name = str(row.get("candidate", ""))
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        return {}
    given = row.get("images") if isinstance(row.get("images"), Mapping) else {}
    links = {kind: f"{name}/{filename}" for kind, filename in CANDIDATE_IMAGES.items()}
    for kind, link in given.items():
        if relative_link(str(link)) is None:
            log.warning("run report: dropping figure link %r of candidate %r: not a relative path "
                        "inside the run folder", link, name)
            continue
        links[str(kind)] = str(link)
    return links


def build_run_report(
    *,
    run_id: str,
    dataset: Mapping[str, Any],
    quality: Mapping[str, Any] | None,
    leaderboard: Sequence[Mapping[str, Any]],
    production: Mapping[str, Any] | None,
    decision: Mapping[str, Any] | None,
    config: Mapping[str, Any],
    confusions: Mapping[str, Any] | None = None,
) -> dict:
    """Assemble the run report as a JSON-serialisable dict.

    Args:
        run_id: the run's id (Airflow run id or CLI-made).
        dataset: ``dataset.json`` contents (hash, source, labels, counts, n_images...), optionally
            with ``splits`` ({split: n}).
        quality: the data-quality result (``success``, ``failures``, ``warnings``...) or None.
        leaderboard: ranked rows from `build_leaderboard` (after `apply_budgets`).
        production: the production model's record and its metrics on the same test split, or None.
        decision: the gate's decision (``promote``, ``reasons``...) or None when not gated yet.
        config: ``PipelineConfig.to_dict()``; credential-looking keys are redacted.
        confusions: the best candidate's ``{candidate, confused_pairs, per_class}`` (from its
            metrics.json), or None.
    """
    rows = [dict(row) for row in leaderboard]
    for row in rows:
        row["images"] = _candidate_images(row)
    best = best_candidate(rows)
    labels = dataset.get("labels") or []
    counts = dataset.get("counts") or {}
    summary = {
        "dataset_hash": dataset.get("dataset_hash"),
        "n_classes": len(labels) or len(counts) or None,
        "n_images": dataset.get("n_images"),
        "n_candidates": len(rows),
        "n_failed": sum(1 for r in rows if r.get("status") == "failed"),
        "best_candidate": best.get("candidate") if best else None,
        "best_accuracy": best.get("accuracy") if best else None,
        "production_accuracy": (production_row(production) or {}).get("accuracy"),
        "quality_passed": None if quality is None else _quality_passed(quality),
        "promote": None if decision is None else _decision_flag(decision),
    }
    report = {
        "run_id": str(run_id),
        "summary": summary,
        "dataset": dict(dataset),
        "quality": None if quality is None else dict(quality),
        "leaderboard": rows,
        "production": None if production is None else dict(production),
        "decision": None if decision is None else dict(decision),
        "config": redact(dict(config)),
        "confusions": None if confusions is None else dict(confusions),
    }
    return to_jsonable(report)


def _quality_passed(quality: Mapping[str, Any]) -> bool | None:
    for key in ("success", "passed", "ok"):
        if isinstance(quality.get(key), bool):
            return quality[key]
    failures = quality.get("failures")
    return (not failures) if isinstance(failures, list) else None


def _decision_flag(decision: Mapping[str, Any]) -> bool | None:
    for key in ("promote", "promoted", "accepted", "passed"):
        if isinstance(decision.get(key), bool):
            return decision[key]
    return None


def _items(values: Any) -> list[str]:
    if not values:
        return []
    if isinstance(values, (str, Mapping)):
        values = [values]
    out = []
    for value in values:
        if isinstance(value, Mapping):
            # e.g. {"expectation": ..., "column": ..., "observed": ...}: show it compactly.
            out.append(", ".join(f"{k}={v}" for k, v in value.items()))
        else:
            out.append(str(value))
    return out


def _kv_table(mapping: Mapping[str, Any], *, skip: Sequence[str] = ()) -> str:
    rows = []
    for key, value in mapping.items():
        if key in skip:
            continue
        if isinstance(value, (Mapping, list, tuple)):
            text = json.dumps(to_jsonable(value), sort_keys=True)
            if len(text) > 300:
                text = text[:297] + "..."
        else:
            text = "-" if value is None else str(value)
        rows.append(f"<tr><th>{esc(key)}</th><td>{esc(text)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>" if rows else "<p class=\"muted\">(empty)</p>"


def dataset_section(dataset: Mapping[str, Any]) -> str:
    """HTML for a dataset summary: identity, sizes, per-class counts (collapsed)."""
    labels = list(dataset.get("labels") or [])
    counts = dataset.get("counts") or {}
    parts = [_kv_table({
        "dataset hash": dataset.get("dataset_hash"),
        "source": dataset.get("source"),
        "layout": dataset.get("layout"),
        "classes": len(labels) or len(counts),
        "images": dataset.get("n_images"),
        "usable (ok)": dataset.get("n_ok"),
        "quarantined": dataset.get("n_quarantined"),
        "created at": dataset.get("created_at"),
    })]
    splits = dataset.get("splits")
    if isinstance(splits, Mapping) and splits:
        parts.append("<p>Split sizes: " + ", ".join(f"{esc(k)} {esc(v)}" for k, v in splits.items()) + "</p>")
    if counts:
        values = [int(v) for v in counts.values() if isinstance(v, (int, float))]
        if values:
            parts.append(f"<p>Images per class: min {min(values)}, median {statistics.median(values):g}, "
                         f"max {max(values)} (imbalance ratio {max(values) / max(min(values), 1):.1f}).</p>")
        table = "".join(f"<tr><td>{esc(k)}</td><td class=\"num\">{esc(v)}</td></tr>"
                        for k, v in counts.items())
        parts.append(f"<details><summary>Per-class counts ({len(counts)} classes)</summary>"
                     f"<table><tr><th>class</th><th>images</th></tr>{table}</table></details>")
    return "\n".join(parts)


def quality_section(quality: Mapping[str, Any] | None) -> str:
    """HTML for the data-quality result: verdict, failures, warnings, other scalars."""
    if quality is None:
        return "<p class=\"muted\">No data-quality result was recorded.</p>"
    passed = _quality_passed(quality)
    verdict = {True: "<p class=\"ok\">Data-quality suite passed.</p>",
               False: "<p class=\"bad\">Data-quality suite failed.</p>"}.get(passed, "")
    parts = [verdict]
    for key, css, title in (("failures", "bad", "Failures"), ("warnings", "warn", "Warnings")):
        items = _items(quality.get(key))
        if items:
            parts.append(f"<h3>{title} ({len(items)})</h3><ul class=\"{css}\">"
                         + "".join(f"<li>{esc(item)}</li>" for item in items) + "</ul>")
        else:
            parts.append(f"<p class=\"muted\">No {title.lower()}.</p>")
    conflicts = quality.get("label_conflicts")
    if isinstance(conflicts, list) and conflicts:
        from ml.data.quality_page import conflicts_html

        parts.append(conflicts_html(conflicts, heading="h3"))
    rest = {k: v for k, v in quality.items()
            if k not in ("failures", "warnings", "success", "passed", "ok", "label_conflicts")}
    if rest:
        parts.append("<details><summary>Details</summary>" + _kv_table(rest) + "</details>")
    return "\n".join(parts)


def decision_section(decision: Mapping[str, Any] | None) -> str:
    """HTML for the gate's decision and its reasons."""
    if decision is None:
        return "<p class=\"muted\">The gate has not decided (no decision recorded).</p>"
    flag = _decision_flag(decision)
    verdict = {True: "<p class=\"ok\"><strong>Promote</strong>: the challenger passed the gate.</p>",
               False: "<p class=\"bad\"><strong>Keep production</strong>: "
                      "the challenger did not pass the gate.</p>",
               }.get(flag, "")
    reasons = _items(decision.get("reasons"))
    parts = [verdict]
    if reasons:
        parts.append("<ul>" + "".join(f"<li>{esc(r)}</li>" for r in reasons) + "</ul>")
    shown = {"reasons", "promote", "promoted", "accepted", "passed"} if flag is not None else {"reasons"}
    rest = {k: v for k, v in decision.items() if k not in shown}
    if rest:
        parts.append(_kv_table(rest))
    return "\n".join(parts)


def _production_section(production: Mapping[str, Any] | None, best: Mapping[str, Any] | None) -> str:
    prod = production_row(production)
    if prod is None:
        return "<p>No production model yet: the first model is gated against chance only.</p>"
    text = (f"<p>{esc(prod['candidate'])} on the same test split: "
            f"accuracy {esc(pct(prod.get('accuracy')))}, log loss {esc(num(prod.get('log_loss')))}.")
    numbers = (int, float)
    if best and isinstance(best.get("accuracy"), numbers) and isinstance(prod.get("accuracy"), numbers):
        delta = best["accuracy"] - prod["accuracy"]
        text += f" Best candidate {esc(best['candidate'])}: {delta * 100:+.1f} accuracy points."
    return text + "</p>"


def _confusions_html(confusions: Any) -> str:
    if not isinstance(confusions, Mapping):
        return "<p class=\"muted\">No confusion analysis (no candidate was scored).</p>"
    summary, per_class = confusions.get("confused_pairs"), confusions.get("per_class")
    return confusion_section(summary if isinstance(summary, Mapping) else None,
                             per_class if isinstance(per_class, Mapping) else None,
                             candidate=confusions.get("candidate"))


def render_run_report_html(report: Mapping[str, Any]) -> str:
    """The run report as one self-contained HTML page (figures linked by relative path)."""
    rows = report.get("leaderboard") or []
    best = best_candidate(rows)
    summary = report.get("summary") or {}
    if best:
        headline = (f"Best candidate: <strong>{esc(best['candidate'])}</strong> "
                    f"(accuracy {esc(pct(best.get('accuracy')))})")
    else:
        headline = "<strong>No eligible candidate.</strong>"
    figures = []
    for row in rows:
        images = row.get("images") if isinstance(row.get("images"), Mapping) else {}
        # Checked again here: a report.json read back from the store may not come from build_run_report.
        safe = [(kind, link, url) for kind, link in images.items()
                if (url := relative_link(str(link))) is not None]
        if not safe:
            continue
        cells = "".join(
            f"<figure><a href=\"{esc(url)}\"><img src=\"{esc(url)}\" "
            f"alt=\"{esc(row.get('candidate'))} {esc(kind)}\" loading=\"lazy\"></a>"
            f"<figcaption>{esc(kind)}: <a href=\"{esc(url)}\">{esc(link)}</a>"
            "</figcaption></figure>"
            for kind, link, url in safe)
        figures.append(f"<h3>{esc(row.get('candidate'))}</h3><div class=\"figures\">{cells}</div>")
    body = [
        f"<h1>Run report: {esc(report.get('run_id'))}</h1>",
        f"<p>{headline}. {esc(summary.get('n_candidates'))} candidate(s), "
        f"{esc(summary.get('n_failed'))} failed.</p>",
        "<h2>Gate decision</h2>", decision_section(report.get("decision")),
        "<h2>Dataset</h2>", dataset_section(report.get("dataset") or {}),
        "<h2>Data quality</h2>", quality_section(report.get("quality")),
        "<h2>Leaderboard</h2>", leaderboard_html_table(rows, production=report.get("production")),
        "<h2>Production model</h2>", _production_section(report.get("production"), best),
        "<h2>Confused classes</h2>", _confusions_html(report.get("confusions")),
        "<h2>Candidate figures</h2>",
        "\n".join(figures) or "<p class=\"muted\">No figures (no candidate finished).</p>",
        "<h2>Configuration</h2>",
        "<details><summary>Pipeline configuration (credentials redacted)</summary><pre>"
        + esc(json.dumps(report.get("config") or {}, indent=2, sort_keys=True)) + "</pre></details>",
    ]
    return html_page(f"Run report {report.get('run_id')}", "\n".join(body))


def write_run_report(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json`` and ``report.html`` into `out_dir` (atomically).

    Returns:
        {"json": path, "html": path}.
    """
    out = Path(out_dir)
    text = json.dumps(to_jsonable(report), indent=2, sort_keys=True) + "\n"
    json_path = write_atomic(out / "report.json", text)
    html_path = write_atomic(out / "report.html", render_run_report_html(report))
    log.info("wrote run report %s and %s", json_path, html_path)
    return {"json": json_path, "html": html_path}
