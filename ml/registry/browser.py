"""HTML pages of the model registry, for the Airflow UI plugin (and anyone else serving them).

The pages read only what the pipeline publishes: `production.json`, `versions/*/version.json`,
the promotion log and each run's `report.json`. Artifacts are served by an allow-list of
suffixes under `runs/` and `versions/`; model files are never served through here.
"""

from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING, Any

from ml.errors import MissingObjectError

if TYPE_CHECKING:
    from ml.registry.store import ObjectStore

CONTENT_TYPES = {".png": "image/png", ".html": "text/html; charset=utf-8", ".json": "application/json",
                 ".csv": "text/csv; charset=utf-8"}
_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5rem;color:#1f2937;max-width:1200px}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.8rem;border-bottom:1px solid #e5e7eb;padding-bottom:.3rem}
table{border-collapse:collapse;width:100%;font-size:.88rem}th,td{padding:.35rem .6rem;border-bottom:1px solid #e5e7eb;
text-align:left;vertical-align:top}th{background:#f9fafb}td.num{text-align:right;font-variant-numeric:tabular-nums}
.card{border:1px solid #d1d5db;border-radius:8px;padding:1rem;background:#f8fafc}.ok{color:#047857}.no{color:#b45309}
.badge{display:inline-block;padding:0 .45rem;border-radius:9px;background:#dbeafe;font-size:.8rem}a{color:#1d4ed8}
.muted{color:#6b7280;font-size:.85rem}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{body}</body></html>")


def list_runs(store: ObjectStore, model_name: str) -> list[str]:
    """Run ids that published a report, newest first (run ids start with their type and time)."""
    from ml.errors import UnsafeNameError
    from ml.registry.layout import run_id_from_segment, runs_root

    prefix = runs_root(model_name)
    segments = {key[len(prefix):].split("/", 1)[0] for key in store.list_keys(prefix)
                if key.endswith("/report.json")}
    runs = []
    for segment in segments:
        try:
            runs.append(run_id_from_segment(segment))
        except UnsafeNameError:
            continue  # not a folder this pipeline wrote: never linked, never rendered
    return sorted(runs, key=_run_sort_key, reverse=True)


def _run_sort_key(run_id: str) -> str:
    return run_id.split("__", 1)[-1]


def run_href(base_url: str, run_id: Any) -> str | None:
    """The registry page of a run (by its reversible store segment), or None for an unusable id."""
    from ml.errors import UnsafeNameError
    from ml.registry.layout import run_segment

    try:
        return f"{base_url}/runs/{run_segment(str(run_id))}"
    except UnsafeNameError:
        return None


def _run_link(base_url: str, run_id: Any) -> str:
    href = run_href(base_url, run_id)
    return f"<a href='{_e(href)}'>{_e(run_id)}</a>" if href else _e(run_id)


def render_overview(store: ObjectStore, model_name: str, *, base_url: str = "") -> str:
    """The registry page: production, versions, promotion history with reasons, recent runs."""
    from ml.registry.versions import list_versions, promotion_history, read_pointer

    pointer, _ = read_pointer(store, model_name)
    parts = [f"<h1>Model registry: {_e(model_name)}</h1>",
             f"<p class='muted'>bucket {_e(store.uri(''))}</p>"]
    if pointer is None:
        parts.append("<div class='card'>No production model yet: run the <code>image_classifier_retraining</code> "
                     "DAG.</div>")
    else:
        metrics = pointer.get("metrics") or {}
        card = f"{base_url}/artifact/versions/{_e(pointer['version'])}/model_card.html"
        parts.append(
            "<h2>Production</h2><div class='card'>"
            f"<b>{_e(pointer['version'])}</b> <span class='badge'>{_e(pointer.get('candidate', ''))}</span><br>"
            f"accuracy <b>{_num(metrics.get('accuracy'))}</b> · top-5 {_num(metrics.get('top5_accuracy'))} · "
            f"log loss {_num(metrics.get('log_loss'))} · macro F1 {_num(metrics.get('macro_f1'))}<br>"
            f"<span class='muted'>promoted {_e(pointer.get('promoted_at'))} by run {_e(pointer.get('run_id'))}; "
            f"dataset {_e(str(pointer.get('dataset_hash', ''))[:12])}; "
            f"sha256 {_e(str(pointer.get('sha256', ''))[:16])}…"
            f"</span><br><a href='{card}'>model card</a> · <code>{_e(pointer.get('uri'))}</code></div>")

    versions = list_versions(store, model_name)
    rows = "".join(
        f"<tr><td>{'★ ' if v.get('is_production') else ''}{_e(v['version'])}</td><td>{_e(v.get('candidate'))}</td>"
        f"<td class='num'>{_num((v.get('metrics') or {}).get('accuracy'))}</td>"
        f"<td class='num'>{_num((v.get('metrics') or {}).get('log_loss'))}</td><td>{_e(v.get('created_at'))}</td>"
        f"<td><a href='{base_url}/artifact/versions/{_e(v['version'])}/model_card.html'>card</a></td></tr>"
        for v in versions)
    parts.append("<h2>Versions</h2><table><tr><th>version</th><th>candidate</th><th>accuracy</th><th>log loss</th>"
                 f"<th>created</th><th></th></tr>{rows or '<tr><td colspan=6>none</td></tr>'}</table>")

    history = list(reversed(promotion_history(store, model_name)))[:50]
    rows = "".join(
        f"<tr><td>{_e(h.get('at'))}</td><td class='{'ok' if h.get('action') in ('promote', 'rollback') else 'no'}'>"
        f"{_e(h.get('action'))}</td><td>{_e(h.get('from'))} → {_e(h.get('to'))}</td>"
        f"<td>{_run_link(base_url, h.get('run_id')) if h.get('run_id') else ''}</td>"
        f"<td>{'<br>'.join(_e(r) for r in h.get('reasons', []))}</td></tr>" for h in history)
    parts.append("<h2>Gate decisions and promotions</h2><table><tr><th>when</th><th>action</th><th>pointer</th>"
                 f"<th>run</th><th>reasons</th></tr>{rows or '<tr><td colspan=5>none</td></tr>'}</table>")

    runs = list_runs(store, model_name)[:30]
    items = "".join(f"<li>{_run_link(base_url, r)}</li>" for r in runs)
    parts.append(f"<h2>Runs</h2><ul>{items or '<li>none</li>'}</ul>")
    return _page(f"Model registry: {model_name}", "".join(parts))


def render_run(store: ObjectStore, model_name: str, run_segment: str, *, base_url: str = "") -> str:
    """One run (named by its store segment, as `run_href` links it): the decision, the leaderboard
    with links to plots, quality report and model card.

    Raises:
        PermissionError: `run_segment` is not a run folder name this pipeline writes.
    """
    run_id = _decode_run(run_segment)
    prefix = f"runs/{run_segment}"
    try:
        report = store.get_json(f"{model_name}/{prefix}/report.json")
    except MissingObjectError:  # a store that is down is not "no report": the caller says 502
        return _page("run not found", f"<h1>No report for run {_e(run_id)}</h1><p><a href='{base_url}/'>back</a></p>")
    decision = report.get("decision") or {}
    verdict = ("<b class='ok'>promoted</b> " + _e(decision.get("version"))) if decision.get("promoted") \
        else "<b class='no'>production kept</b>"
    parts = [f"<p><a href='{base_url}/'>← registry</a></p><h1>Run {_e(run_id)}</h1>",
             f"<div class='card'>{verdict}<ul>"
             + "".join(f"<li>{_e(r)}</li>" for r in decision.get("reasons", [])) + "</ul></div>"]
    production = report.get("production") or {}
    if production:
        parts.append(f"<p>Production on this run's test split: accuracy <b>{_num(production.get('accuracy'))}</b>, "
                     f"log loss {_num(production.get('log_loss'))}</p>")
    head = ("<tr><th>#</th><th>candidate</th><th>accuracy</th><th>top-5</th><th>log loss</th><th>macro F1</th>"
            "<th>ECE</th><th>train s</th><th>params</th><th>latency ms</th><th>plots</th></tr>")
    rows = []
    for row in report.get("leaderboard", []):
        cand = _e(row.get("candidate"))
        links = " · ".join(f"<a href='{base_url}/artifact/{prefix}/{cand}/{name}'>{label}</a>"
                           for name, label in (("curves.png", "curves"), ("confusion.png", "confusion"),
                                               ("confusion.csv", "csv"), ("metrics.json", "metrics")))
        rows.append(f"<tr><td>{_e(row.get('rank'))}</td><td>{cand}</td><td class='num'>{_num(row.get('accuracy'))}</td>"
                    f"<td class='num'>{_num(row.get('top5_accuracy'))}</td><td class='num'>{_num(row.get('log_loss'))}"
                    f"</td><td class='num'>{_num(row.get('macro_f1'))}</td><td class='num'>{_num(row.get('ece'))}</td>"
                    f"<td class='num'>{_num(row.get('train_wall_time_s'), 0)}</td>"
                    f"<td class='num'>{_e(row.get('params'))}</td>"
                    f"<td class='num'>{_num(row.get('latency_ms'), 1)}</td><td>{links}</td></tr>")
    parts.append(f"<h2>Leaderboard (test split)</h2><table>{head}{''.join(rows)}</table>")
    links = [("report.html", "full run report"), ("quality/quality.html", "data-quality report"),
             ("quality/quality.json", "data-quality JSON"), ("gate.json", "gate decision JSON")]
    if decision.get("promoted") and decision.get("version"):
        links.append((f"../../versions/{decision['version']}/model_card.html", "model card"))
    parts.append("<h2>Artifacts</h2><ul>" + "".join(
        f"<li><a href='{base_url}/artifact/{_e(_normalise(prefix + '/' + path))}'>{label}</a></li>"
        for path, label in links) + "</ul>")
    return _page(f"Run {run_id}", "".join(parts))


def read_artifact(store: ObjectStore, model_name: str, path: str) -> tuple[bytes, str]:
    """An artifact's bytes and content type; only reports and plots, never models or secrets.

    `path` is ``runs/<run segment>/<file path>`` or ``versions/<version>/<file path>``; every
    segment is checked (a run segment must decode, the rest be plain names), so nothing outside
    those folders can be asked for.
    """
    from ml.errors import UnsafeNameError
    from ml.registry.layout import check_relative_path, check_version

    path = _normalise(path)
    parts = path.split("/")
    if len(parts) < 3 or parts[0] not in ("runs", "versions") or ".." in parts:
        raise PermissionError(f"not a registry artifact path: {path[:200]!r}")
    try:
        if parts[0] == "runs":
            _decode_run(parts[1])
        else:
            check_version(parts[1])
        check_relative_path("/".join(parts[2:]), "artifact path")
    except UnsafeNameError as exc:
        raise PermissionError(f"not a registry artifact path: {exc}") from None
    suffix = "." + path.rsplit(".", 1)[-1].lower() if "." in path else ""
    if suffix not in CONTENT_TYPES:
        raise PermissionError(f"artifacts of type {suffix or '(none)'} are not served here")
    return store.get_bytes(f"{model_name}/{path}"), CONTENT_TYPES[suffix]


def _normalise(path: str) -> str:
    out: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if out:
                out.pop()
            continue
        out.append(part)
    return "/".join(out)


def _decode_run(segment: str) -> str:
    """The run id of a run segment; PermissionError (a 400 in the plugin) when it is not one."""
    from ml.errors import UnsafeNameError
    from ml.registry.layout import run_id_from_segment

    try:
        return run_id_from_segment(segment)
    except UnsafeNameError as exc:
        raise PermissionError(str(exc)) from None


def registry_summary(store: ObjectStore, model_name: str) -> dict[str, Any]:
    """The same information as JSON (for scripts and tests)."""
    from ml.registry.versions import list_versions, promotion_history, read_pointer

    pointer, _ = read_pointer(store, model_name)
    return json.loads(json.dumps({"production": pointer, "versions": list_versions(store, model_name),
                                  "history": promotion_history(store, model_name),
                                  "runs": list_runs(store, model_name)}, default=str))
