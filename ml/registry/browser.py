"""HTML pages of the model registry, for the Airflow UI plugin (and anyone else serving them).

The pages read only what the pipeline publishes: `production.json`, `versions/*/version.json`,
the promotion log and each run's `report.json`. Artifacts are served by an allow-list of
suffixes under `runs/` and `versions/`; model files are never served through here.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import posixpath
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from ml.errors import MissingObjectError
from ml.evaluation.html import esc, html_page, num

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ml.registry.store import ObjectStore

CONTENT_TYPES = {".png": "image/png", ".html": "text/html; charset=utf-8", ".json": "application/json",
                 ".csv": "text/csv; charset=utf-8"}
def list_runs(store: ObjectStore, model_name: str) -> list[str]:
    """Run ids that published a report, newest first (run ids start with their type and time)."""
    from ml.errors import UnsafeNameError
    from ml.registry.layout import REPORT_FILE, run_id_from_segment, runs_root

    prefix = runs_root(model_name)
    segments = {key[len(prefix):].split("/", 1)[0] for key in store.list_keys(prefix)
                if key.endswith("/" + REPORT_FILE)}
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
    return f"<a href='{esc(href)}'>{esc(run_id)}</a>" if href else esc(run_id)


def render_overview(store: ObjectStore, model_name: str, *, base_url: str = "") -> str:
    """The registry page: production, versions, promotion history with reasons, recent runs."""
    from ml.registry.versions import list_versions, promotion_history, read_pointer

    pointer, _ = read_pointer(store, model_name)
    parts = [f"<h1>Model registry: {esc(model_name)}</h1>",
             f"<p class='muted'>bucket {esc(store.uri(''))}</p>"]
    if pointer is None:
        parts.append("<div class='card'>No production model yet: run the <code>image_classifier_retraining</code> "
                     "DAG.</div>")
    else:
        metrics = pointer.get("metrics") or {}
        card = f"{base_url}/artifact/versions/{esc(pointer['version'])}/model_card.html"
        parts.append(
            "<h2>Production</h2><div class='card'>"
            f"<b>{esc(pointer['version'])}</b> <span class='badge'>{esc(pointer.get('candidate', ''))}</span><br>"
            f"accuracy <b>{num(metrics.get('accuracy'))}</b> · top-5 {num(metrics.get('top5_accuracy'))} · "
            f"log loss {num(metrics.get('log_loss'))} · macro F1 {num(metrics.get('macro_f1'))}<br>"
            f"<span class='muted'>promoted {esc(pointer.get('promoted_at'))} by run {esc(pointer.get('run_id'))}; "
            f"dataset {esc(str(pointer.get('dataset_hash', ''))[:12])}; "
            f"sha256 {esc(str(pointer.get('sha256', ''))[:16])}…"
            f"</span><br><a href='{card}'>model card</a> · <code>{esc(pointer.get('uri'))}</code></div>")

    versions = list_versions(store, model_name)
    rows = "".join(
        f"<tr><td>{'★ ' if v.get('is_production') else ''}{esc(v['version'])}</td><td>{esc(v.get('candidate'))}</td>"
        f"<td class='num'>{num((v.get('metrics') or {}).get('accuracy'))}</td>"
        f"<td class='num'>{num((v.get('metrics') or {}).get('log_loss'))}</td><td>{esc(v.get('created_at'))}</td>"
        f"<td>{_version_links(base_url, v)}</td></tr>" for v in versions)
    parts.append("<h2>Versions</h2><table><tr><th>version</th><th>candidate</th><th>accuracy</th><th>log loss</th>"
                 f"<th>created</th><th></th></tr>{rows or '<tr><td colspan=6>none</td></tr>'}</table>")

    history = list(reversed(promotion_history(store, model_name)))[:50]
    rows = "".join(
        f"<tr><td>{esc(h.get('at'))}</td><td class='{'ok' if h.get('action') in ('promote', 'rollback') else 'no'}'>"
        f"{esc(h.get('action'))}</td><td>{esc(h.get('from'))} → {esc(h.get('to'))}</td>"
        f"<td>{_run_link(base_url, h.get('run_id')) if h.get('run_id') else ''}</td>"
        f"<td>{'<br>'.join(esc(r) for r in h.get('reasons', []))}</td><td>{_approval_cell(h.get('approval'))}</td>"
        "</tr>" for h in history)
    parts.append("<h2>Gate decisions and promotions</h2><table><tr><th>when</th><th>action</th><th>pointer</th>"
                 "<th>run</th><th>reasons</th><th>human approval</th></tr>"
                 f"{rows or '<tr><td colspan=6>none</td></tr>'}</table>")

    runs = list_runs(store, model_name)[:30]
    items = "".join(f"<li>{_run_link(base_url, r)}</li>" for r in runs)
    parts.append(f"<h2>Runs</h2><ul>{items or '<li>none</li>'}</ul>")
    return html_page(f"Model registry: {model_name}", "".join(parts))


def _approval_cell(record: Any) -> str:
    """Who decided, when, and their comment (every part from the log, escaped); empty when not asked."""
    from ml.registry.approval import approval_summary

    if not isinstance(record, dict):
        return ""
    outcome = str(record.get("outcome") or "")
    css = "ok" if outcome == "approved" else "no"
    return f"<span class='{css}'>{esc(approval_summary(record))}</span>"


def _version_links(base_url: str, version: dict[str, Any]) -> str:
    """The model card, and the Kaggle submission.csv when the promote step wrote one."""
    from ml.registry.layout import SUBMISSION_FILE

    folder = f"{base_url}/artifact/versions/{esc(version['version'])}"
    links = [f"<a href='{folder}/model_card.html'>card</a>"]
    if version.get("submission"):
        links.append(f"<a href='{folder}/{SUBMISSION_FILE}' download>{SUBMISSION_FILE}</a>")
    return " · ".join(links)


def render_run(store: ObjectStore, model_name: str, run_segment: str, *, base_url: str = "") -> str:
    """One run (named by its store segment, as `run_href` links it): the decision, the leaderboard
    with links to plots, quality report and model card.

    Raises:
        PermissionError: `run_segment` is not a run folder name this pipeline writes.
    """
    run_id = _decode_run(run_segment)
    from ml.registry.layout import REPORT_FILE, run_key

    prefix = f"runs/{run_segment}"  # of the artifact links below (URLs, not keys)
    try:
        report = store.get_json(run_key(model_name, run_id, REPORT_FILE))
    except MissingObjectError:  # a store that is down is not "no report": the caller says 502
        return html_page("run not found",
                         f"<h1>No report for run {esc(run_id)}</h1><p><a href='{base_url}/'>back</a></p>")
    decision = report.get("decision") or {}
    verdict = ("<b class='ok'>promoted</b> " + esc(decision.get("version"))) if decision.get("promoted") \
        else "<b>awaiting human approval</b>" if decision.get("awaiting_approval") \
        else "<b class='no'>production kept</b>"
    if isinstance(decision.get("approval"), dict):
        verdict += f" · human approval: {_approval_cell(decision['approval'])}"
    parts = [f"<p><a href='{base_url}/'>← registry</a></p><h1>Run {esc(run_id)}</h1>",
             f"<div class='card'>{verdict}<ul>"
             + "".join(f"<li>{esc(r)}</li>" for r in decision.get("reasons", [])) + "</ul></div>"]
    production = report.get("production") or {}
    if production:
        parts.append(f"<p>Production on this run's test split: accuracy <b>{num(production.get('accuracy'))}</b>, "
                     f"log loss {num(production.get('log_loss'))}</p>")
    head = ("<tr><th>#</th><th>candidate</th><th>accuracy</th><th>top-5</th><th>log loss</th><th>macro F1</th>"
            "<th>ECE</th><th>train s</th><th>params</th><th>latency ms</th><th>plots</th></tr>")
    rows = []
    for row in report.get("leaderboard", []):
        cand = esc(row.get("candidate"))
        links = " · ".join(f"<a href='{base_url}/artifact/{prefix}/{cand}/{name}'>{label}</a>"
                           for name, label in (("curves.png", "curves"), ("confusion.png", "confusion"),
                                               ("confusion.csv", "csv"), ("metrics.json", "metrics")))
        rows.append(f"<tr><td>{esc(row.get('rank'))}</td><td>{cand}</td><td class='num'>{num(row.get('accuracy'))}</td>"
                    f"<td class='num'>{num(row.get('top5_accuracy'))}</td><td class='num'>{num(row.get('log_loss'))}"
                    f"</td><td class='num'>{num(row.get('macro_f1'))}</td><td class='num'>{num(row.get('ece'))}</td>"
                    f"<td class='num'>{num(row.get('train_wall_time_s'), 0)}</td>"
                    f"<td class='num'>{esc(row.get('params'))}</td>"
                    f"<td class='num'>{num(row.get('latency_ms'), 1)}</td><td>{links}</td></tr>")
    parts.append(f"<h2>Leaderboard (test split)</h2><table>{head}{''.join(rows)}</table>")
    links = [("report.html", "full run report"), ("quality/quality.html", "data-quality report"),
             ("quality/quality.json", "data-quality JSON"), ("gate.json", "gate decision JSON")]
    if decision.get("promoted") and decision.get("version"):
        links.append((f"../../versions/{decision['version']}/model_card.html", "model card"))
    parts.append("<h2>Artifacts</h2><ul>" + "".join(
        f"<li><a href='{base_url}/artifact/{esc(_normalise(prefix + '/' + path))}'>{label}</a></li>"
        for path, label in links) + "</ul>")
    return html_page(f"Run {run_id}", "".join(parts))


def read_artifact(store: ObjectStore, model_name: str, path: str) -> tuple[bytes, str]:
    """An artifact's bytes and content type; only reports and plots, never models or secrets.

    `path` is ``runs/<run segment>/<file path>`` or ``versions/<version>/<file path>``; every
    segment is checked (a run segment must decode, the rest be plain names), so nothing outside
    those folders can be asked for.
    """
    from ml.errors import UnsafeNameError
    from ml.registry.layout import artifact_key

    path = _normalise(path)
    try:
        key = artifact_key(model_name, path)
    except UnsafeNameError as exc:
        raise PermissionError(f"not a registry artifact path: {exc}") from None
    suffix = "." + path.rsplit(".", 1)[-1].lower() if "." in path else ""
    if suffix not in CONTENT_TYPES:
        raise PermissionError(f"artifacts of type {suffix or '(none)'} are not served here")
    return store.get_bytes(key), CONTENT_TYPES[suffix]


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


# A run report embeds a few PNGs per candidate (curves, confusion); 5 MiB per image and 40 MiB
# per page are far above what the pipeline writes and bound what one request reads into memory.
MAX_INLINE_IMAGE_BYTES = 5 * 2**20
MAX_INLINE_PAGE_BYTES = 40 * 2**20
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# An <img src=...> or <a href=...> attribute (quoted, as every HTML writer here quotes them).
_PNG_REF = re.compile(r"""(<(img|a)\b[^>]*?\s(src|href)\s*=\s*)(["'])([^"'<>]*)\4""", re.IGNORECASE)


def embed_png_links(page: str, page_path: str, read: Callable[[str], tuple[bytes, str]]) -> str:
    """Embed the PNGs a stored HTML page references by relative path (`<img src>`, `<a href>`) as data: URIs.

    A stored page is served sandboxed: its own requests and in-frame navigations carry no
    Airflow cookie, so a relative image or link to another artifact would only meet the login.

    Args:
        page: the HTML text as stored.
        page_path: its artifact path (e.g. ``runs/<run>/report.html``); references resolve from
            its folder.
        read: reads an artifact path (with the registry's allow-list) and returns (bytes, type).

    Returns:
        The page with every resolvable PNG embedded; other references are left as they are
        (the artifact CSP stops them loading).
    """
    base = posixpath.dirname(page_path)
    budget = [MAX_INLINE_PAGE_BYTES]
    embedded: dict[str, str | None] = {}

    def data_uri(target: str) -> str | None:
        if target not in embedded:
            embedded[target] = None
            try:
                body, _ = read(target)
            except (PermissionError, LookupError) as exc:
                log.info("registry page %s: image %s not embedded: %s", page_path, target, exc)
                return None
            if not body.startswith(_PNG_SIGNATURE) or len(body) > min(MAX_INLINE_IMAGE_BYTES, budget[0]):
                log.warning("registry page %s: image %s not embedded (%d bytes, PNG signature %s)",
                            page_path, target, len(body), body.startswith(_PNG_SIGNATURE))
                return None
            budget[0] -= len(body)
            embedded[target] = "data:image/png;base64," + base64.b64encode(body).decode()
        return embedded[target]

    def embed(match: re.Match[str]) -> str:
        ref = unquote(html.unescape(match.group(5)).strip())
        # Only relative paths: no scheme (http:, data:, javascript:), no absolute or
        # protocol-relative URL, no fragment, no query.
        if not ref or ref.startswith(("/", "\\", "#")) or ":" in ref.split("/", 1)[0] or "?" in ref:
            return match.group(0)
        target = posixpath.normpath(posixpath.join(base, ref))
        if target.startswith("../") or not target.lower().endswith(".png"):
            return match.group(0)
        uri = data_uri(target)
        if uri is None:
            return match.group(0)
        return f"{match.group(1)}{match.group(4)}{uri}{match.group(4)}"

    return _PNG_REF.sub(embed, page)
