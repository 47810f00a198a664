"""Rank candidates, mark budget overruns, and render the leaderboard as text, JSON and HTML.

A leaderboard row is one candidate's test metrics merged with its train summary:
``candidate, accuracy, top5_accuracy, log_loss, macro_f1, ece, train_wall_time_s, peak_rss_mb,
params, model_bytes, latency_ms, status`` ("ok", "failed" or "over budget") plus any other keys.
The HTML helpers here (`html_page`, `leaderboard_html_table`) are shared by the run report and
the model card so the three look alike. Everything user-supplied is escaped.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ml.errors import ConfigError, DataError
from ml.evaluation.html import esc, html_page
from ml.io import to_jsonable, write_atomic

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_OVER_BUDGET = "over budget"
# A search trial that stopped before the last rung: on the board, ranked, never the gate's challenger.
STATUS_ELIMINATED = "eliminated"
# Direction of each rankable metric: True when higher is better.
HIGHER_IS_BETTER = {
    "accuracy": True,
    "top5_accuracy": True,
    "macro_f1": True,
    "log_loss": False,
    "ece": False,
}
BYTES_PER_MB = 1_000_000  # decimal megabytes, as budgets and the table state them

# (header, key, formatter) of the text and HTML tables.
_COLUMNS: list[tuple[str, str, str]] = [
    ("acc", "accuracy", "pct"),
    ("top5", "top5_accuracy", "pct"),
    ("logloss", "log_loss", "f3"),
    ("F1", "macro_f1", "pct"),
    ("ECE", "ece", "f3"),
    ("train s", "train_wall_time_s", "f0"),
    ("MB", "model_bytes", "mb"),
    ("params", "params", "count"),
    ("latency ms", "latency_ms", "f1"),
    ("vs parent", "vs_parent_points", "signed"),
]
# Shown only when a row is a search trial: its rung and settings.
_SEARCH_COLUMN = ("search", "search", "search")


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    return _COLUMNS + [_SEARCH_COLUMN] if any(isinstance(r.get("search"), Mapping) for r in rows) else _COLUMNS


def _number(value: Any) -> float | None:
    """A finite float, or None for missing/NaN/non-numeric values."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _status(row: Mapping[str, Any]) -> str:
    return str(row.get("status") or STATUS_OK)


def build_leaderboard(entries: Sequence[Mapping[str, Any]], *, metric: str = "accuracy") -> list[dict]:
    """Sort candidates best-first by `metric` and number them.

    Rows whose status is "failed", or that have no finite value of `metric`, go last in their
    input order with ``rank`` None. The others (status "ok" or "over budget": budget does not
    change quality) are sorted by `metric` in its direction; ties keep their input order.
    Input dicts are not modified.

    Raises:
        ConfigError: unknown metric.
        DataError: an entry without a candidate name, or a name used twice.
    """
    if metric not in HIGHER_IS_BETTER:
        raise ConfigError(f"leaderboard metric {metric!r} is not rankable; "
                          f"allowed: {sorted(HIGHER_IS_BETTER)}")
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        name = entry.get("candidate")
        if not name:
            raise DataError(f"leaderboard entry {index} has no 'candidate' name: keys {sorted(entry)}")
        if name in seen:
            raise DataError(f"candidate {name!r} appears twice in the leaderboard entries")
        seen.add(str(name))

    rankable: list[dict] = []
    unrankable: list[dict] = []
    for entry in entries:
        row = dict(entry)
        row["status"] = _status(row)
        if row["status"] != STATUS_FAILED and _number(row.get(metric)) is not None:
            rankable.append(row)
        else:
            unrankable.append(row)
    sign = -1.0 if HIGHER_IS_BETTER[metric] else 1.0
    rankable.sort(key=lambda row: sign * _number(row[metric]))  # list.sort is stable: ties keep order
    for rank, row in enumerate(rankable, start=1):
        row["rank"] = rank
    for row in unrankable:
        row["rank"] = None
    rows = rankable + unrankable
    _compare_with_parents(rows, metric)
    if rows:
        scores = (_number(row.get(metric)) for row in rows)
        log.info("leaderboard by %s: %s", metric, ", ".join(
            f"{row['candidate']}={score if score is not None else row['status']}"
            for row, score in zip(rows, scores, strict=True)))
    return rows


def _compare_with_parents(rows: list[dict], metric: str) -> None:
    """Give each row whose ``parent`` is also on the board ``vs_parent_points``: its `metric` minus the parent's.

    In points (x100) for the fractions (accuracy, F1), as is for losses; negative = worse than the
    parent when higher is better. ``worse_than_parent`` says it in the metric's own direction.
    """
    by_name = {row["candidate"]: row for row in rows}
    scale = 100.0 if metric in ("accuracy", "top5_accuracy", "macro_f1") else 1.0
    for row in rows:
        parent = by_name.get(row.get("parent"))
        mine = _number(row.get(metric))
        theirs = _number(parent.get(metric)) if parent is not None else None
        if mine is None or theirs is None:
            continue
        row["vs_parent_points"] = (mine - theirs) * scale
        row["worse_than_parent"] = mine < theirs if HIGHER_IS_BETTER[metric] else mine > theirs
        if row["worse_than_parent"]:
            log.warning("%s is worse than its parent %s on test %s (%.4f vs %.4f); both stay on the board",
                        row["candidate"], parent["candidate"], metric, mine, theirs)


def mark_eliminated(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Mark "ok" search trials that stopped before the last rung as "eliminated" (ranks kept, gate skips them)."""
    out = []
    for source in rows:
        row = dict(source)
        info = row.get("search")
        if _status(row) == STATUS_OK and isinstance(info, Mapping) and int(info.get("rung", 0)) < int(
                info.get("rungs", 0)):
            row["status"] = STATUS_ELIMINATED
            row["eliminated_reason"] = f"stopped after rung {info.get('rung')} of {info.get('rungs')}"
        out.append(row)
    return out


def best_candidate(rows: Sequence[Mapping[str, Any]]) -> dict | None:
    """The highest-ranked row whose status is "ok" (eligible for the gate), or None."""
    for row in rows:
        if _status(row) == STATUS_OK and row.get("rank") is not None:
            return dict(row)
    return None


def apply_budgets(
    rows: Sequence[Mapping[str, Any]],
    *,
    max_model_mb: float | None = None,
    max_latency_ms: float | None = None,
) -> list[dict]:
    """Mark "ok" rows whose model size or latency exceeds a budget as "over budget".

    Adds ``budget_reasons`` (list of str) to every row it marks; order and ranks are kept, so
    the leaderboard still shows quality order while `best_candidate` skips those rows. A row
    with no size/latency recorded cannot be checked and is left as is (with a warning).
    """
    for name, budget in (("max_model_mb", max_model_mb), ("max_latency_ms", max_latency_ms)):
        valid = isinstance(budget, (int, float)) and _number(budget) is not None and budget > 0
        if budget is not None and not valid:
            raise ConfigError(f"{name} must be a positive number or None, got {budget!r}")
    out = []
    for source in rows:
        row = dict(source)
        row["status"] = _status(row)
        if row["status"] == STATUS_OK:
            reasons = []
            size = _number(row.get("model_bytes"))
            latency = _number(row.get("latency_ms"))
            if max_model_mb is not None:
                if size is None:
                    log.warning("candidate %s has no model_bytes; size budget not checked",
                                row.get("candidate"))
                elif size / BYTES_PER_MB > max_model_mb:
                    reasons.append(f"model {size / BYTES_PER_MB:.1f} MB > budget {max_model_mb:g} MB")
            if max_latency_ms is not None:
                if latency is None:
                    log.warning("candidate %s has no latency_ms; latency budget not checked",
                                row.get("candidate"))
                elif latency > max_latency_ms:
                    reasons.append(f"latency {latency:.1f} ms > budget {max_latency_ms:g} ms")
            if reasons:
                row["status"] = STATUS_OVER_BUDGET
                row["budget_reasons"] = reasons
                log.info("candidate %s is over budget: %s", row.get("candidate"), "; ".join(reasons))
        out.append(row)
    return out


def _format(value: Any, kind: str) -> str:
    if kind == "search":
        from ml.training.search import describe_search

        return describe_search(value) if isinstance(value, Mapping) else "-"
    number = _number(value)
    if number is None:
        return "-"
    if kind == "pct":
        return f"{number * 100:.1f}"
    if kind == "signed":
        return f"{number:+.1f}"
    if kind == "f3":
        return f"{number:.3f}"
    if kind == "f1":
        return f"{number:.1f}"
    if kind == "f0":
        return f"{number:.0f}"
    if kind == "mb":
        return f"{number / BYTES_PER_MB:.1f}"
    if kind == "count":
        for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(number) >= threshold:
                return f"{number / threshold:.1f}{suffix}"
        return f"{number:.0f}"
    return str(value)


def production_row(production: Mapping[str, Any] | None) -> dict | None:
    """Flatten a production record ({version, metrics: {...}, ...} or flat) into a table row."""
    if not production:
        return None
    row = {k: v for k, v in production.items() if k != "metrics"}
    metrics = production.get("metrics")
    if isinstance(metrics, Mapping):
        row.update(metrics)
    version = production.get("version")
    row["candidate"] = f"production {version}" if version else "production"
    if production.get("candidate"):
        row["candidate"] += f" ({production['candidate']})"
    return row


def format_leaderboard_table(
    rows: Sequence[Mapping[str, Any]], *, production: Mapping[str, Any] | None = None
) -> str:
    """A fixed-width text table for task logs, best first; the production model marked with '*'.

    Accuracy, top-5 and F1 are percentages; MB are 10^6 bytes.
    """
    columns = _columns(rows)
    headers = ["#", "candidate", *[h for h, _, _ in columns], "status"]
    body: list[list[str]] = []
    for row in rows:
        rank = row.get("rank")
        body.append([str(rank) if rank is not None else "-", str(row.get("candidate", "?")),
                     *[_format(row.get(key), kind) for _, key, kind in columns], _status(row)])
    prod = production_row(production)
    prod_line = None
    if prod is not None:
        prod_line = ["*", prod["candidate"], *[_format(prod.get(key), kind) for _, key, kind in columns],
                     "production"]
    all_lines = body + ([prod_line] if prod_line else [])
    widths = [max(len(headers[i]), *(len(line[i]) for line in all_lines)) if all_lines else len(headers[i])
              for i in range(len(headers))]

    def render(cells: list[str]) -> str:
        # Names left-aligned, numbers right-aligned so decimals line up.
        parts = [cells[0].rjust(widths[0]), cells[1].ljust(widths[1])]
        parts += [cell.rjust(width) for cell, width in zip(cells[2:-1], widths[2:-1], strict=True)]
        parts.append(cells[-1].ljust(widths[-1]))
        return "  ".join(parts).rstrip()

    rule = "-" * len(render(headers))
    lines = [render(headers), rule, *(render(cells) for cells in body)]
    if not body:
        lines.append("(no candidates)")
    if prod_line:
        lines += [rule, render(prod_line), "* production model scored on the same test split"]
    return "\n".join(lines)


def leaderboard_html_table(
    rows: Sequence[Mapping[str, Any]], *, production: Mapping[str, Any] | None = None
) -> str:
    """The leaderboard as an HTML <table> fragment (escaped), best first, production last."""
    columns = _columns(rows)
    head = "".join(f"<th>{esc(h)}</th>" for h in ["#", "candidate", *[h for h, _, _ in columns], "status"])
    lines = [f"<table class=\"leaderboard\"><thead><tr>{head}</tr></thead><tbody>"]
    best = best_candidate(rows)
    for row in rows:
        status = _status(row)
        css = {STATUS_FAILED: "failed", STATUS_OVER_BUDGET: "over-budget", STATUS_ELIMINATED: "over-budget"}.get(
            status, "")
        if best is not None and row.get("candidate") == best.get("candidate"):
            css = "best"
        note = status
        if row.get("budget_reasons"):
            note += ": " + "; ".join(str(r) for r in row["budget_reasons"])
        if status == STATUS_ELIMINATED and row.get("eliminated_reason"):
            note += ": " + str(row["eliminated_reason"])
        if status == STATUS_FAILED and row.get("error"):
            note += ": " + str(row["error"])
        rank = row.get("rank")
        cells = [f"<td class=\"num\">{esc(rank if rank is not None else '-')}</td>",
                 f"<td>{esc(row.get('candidate', '?'))}</td>"]
        cells += [f"<td class=\"num\">{esc(_format(row.get(key), kind))}</td>" for _, key, kind in columns]
        cells.append(f"<td>{esc(note)}</td>")
        lines.append(f"<tr class=\"{css}\">{''.join(cells)}</tr>")
    prod = production_row(production)
    if prod is not None:
        cells = ["<td class=\"num\">*</td>", f"<td>{esc(prod['candidate'])}</td>"]
        cells += [f"<td class=\"num\">{esc(_format(prod.get(key), kind))}</td>" for _, key, kind in columns]
        cells.append("<td>production (same test split)</td>")
        lines.append(f"<tr class=\"production\">{''.join(cells)}</tr>")
    lines.append("</tbody></table>")
    lines.append("<p class=\"muted\">acc, top5 and F1 in %; MB = 10<sup>6</sup> bytes; latency is the median "
                 "single-image time through the serving predictor (compiled model); vs parent = a fine-tuned "
                 "candidate's score minus its parent's (points of the ranking metric). "
                 "Green: best eligible candidate.</p>")
    return "\n".join(lines)


def write_leaderboard(
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    production: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``leaderboard.json`` ({rows, production}) and a self-contained ``leaderboard.html``.

    Returns:
        {"json": path, "html": path}.
    """
    out = Path(out_dir)
    payload = {"rows": to_jsonable(list(rows)), "production": to_jsonable(production)}
    json_path = write_atomic(out / "leaderboard.json", json.dumps(payload, indent=2, sort_keys=True) + "\n")
    body = (f"<h1>Leaderboard</h1>\n<p>{len(rows)} candidate(s), best first, scored on the test split.</p>\n"
            + leaderboard_html_table(rows, production=production))
    html_path = write_atomic(out / "leaderboard.html", html_page("Leaderboard", body))
    log.info("wrote %s and %s", json_path, html_path)
    return {"json": json_path, "html": html_path}
