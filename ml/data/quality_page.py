"""The data-quality page (``quality.html``): one self-contained file, without script, data escaped.

It is ours, not GX's Data Docs: GX's page template loads eight scripts and stylesheets from public
CDNs and printed an unexpected label such as ``<script>…`` unescaped, on a page served under the
Airflow origin. This page is built with the product's HTML kit (`ml.evaluation.html`) and carries
what the GX page showed besides the verdicts: each expectation's rule, observed value, unexpected
count and a few unexpected examples.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ml.evaluation.html import CSS, esc, html_page

if TYPE_CHECKING:
    from ml.data.quality import QualityReport

# How much of the data the page repeats: a value_set of 120 breeds or a 50 kB label would bury
# the table; quality.json keeps everything.
MAX_RULE_VALUES = 10
MAX_EXAMPLES = 5
MAX_VALUE_CHARS = 200

# The kit's stylesheet plus the verdict colours of this page's rows and its examples lists.
PAGE_CSS = CSS + (
    "li.fail,td.failing{color:#b3261e}td.warning{color:#a15c00}td.ok{color:#1e7b34}"
    "ul.examples{margin:0;padding-left:1.2em}td{vertical-align:top;overflow-wrap:anywhere;max-width:28em}\n"
)


def _clip(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _show(value: Any) -> str:
    """One value as short text (strings as they are, the rest as JSON); not yet escaped."""
    if isinstance(value, str):
        return _clip(value)
    return _clip(json.dumps(value, ensure_ascii=False, default=str))


def _expectation_details(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per check name: GX's kwargs, result block and exception info, from the suites' JSON."""
    details: dict[str, dict[str, Any]] = {}
    for suite in (result.get("suites") or {}).values():
        items = suite.get("results") if isinstance(suite, dict) else None
        for item in items or []:
            config = item.get("expectation_config") or {}
            name = (config.get("meta") or {}).get("check")
            if name:
                details[str(name)] = {
                    "kwargs": config.get("kwargs") or {},
                    "result": item.get("result") or {},
                    "exception": item.get("exception_info") or {},
                }
    return details


def _rule_text(kwargs: dict[str, Any]) -> str:
    parts = []
    for key, value in kwargs.items():
        if key in ("batch_id", "column"):
            continue
        if isinstance(value, list):
            # Items JSON-quoted: a label may itself contain ", ".
            shown = ", ".join(_show(json.dumps(v, ensure_ascii=False, default=str)) for v in value[:MAX_RULE_VALUES])
            more = f", … {len(value) - MAX_RULE_VALUES} more" if len(value) > MAX_RULE_VALUES else ""
            parts.append(f"{key}: [{shown}{more}]")
        else:
            parts.append(f"{key}: {_show(value)}")
    return "; ".join(parts)


def _observed_text(result: dict[str, Any]) -> str:
    if "observed_value" in result:
        return _show(result["observed_value"])
    if "unexpected_count" in result:
        percent = result.get("unexpected_percent")
        share = f" ({percent:.1f}%)" if isinstance(percent, (int, float)) else ""
        return f"{result['unexpected_count']} of {result.get('element_count', '?')} unexpected{share}"
    return ""


def _examples_html(result: dict[str, Any]) -> str:
    counts = result.get("partial_unexpected_counts") or []
    if counts:
        items = [f"<li><code>{esc(_show(c.get('value')))}</code> × {esc(str(c.get('count')))}</li>"
                 for c in counts[:MAX_EXAMPLES]]
    else:
        items = [f"<li><code>{esc(_show(v))}</code></li>"
                 for v in (result.get("partial_unexpected_list") or [])[:MAX_EXAMPLES]]
    return f"<ul class='examples'>{''.join(items)}</ul>" if items else ""


def _check_row(check: dict[str, Any], found: dict[str, Any]) -> str:
    """One expectation's table row: name, GX type, data, rule, observed, examples, severity, verdict."""
    result, exception = found.get("result") or {}, found.get("exception") or {}
    column = (found.get("kwargs") or {}).get("column")
    observed = esc(_observed_text(result))
    if exception.get("raised_exception"):
        observed = f"could not run: {esc(_show(exception.get('exception_message') or ''))}"
    outcome = "ok" if check["success"] else str(check["severity"])
    return (
        f"<tr><td>{esc(str(check['check']))}</td><td>{esc(str(check['expectation']))}</td>"
        f"<td>{esc(str(check['frame']))}{'.' + esc(str(column)) if column else ''}</td>"
        f"<td>{esc(_rule_text(found.get('kwargs') or {}))}</td><td>{observed}</td>"
        f"<td>{_examples_html(result)}</td><td>{esc(str(check['severity']))}</td>"
        f"<td class='{esc(outcome)}'>{'pass' if check['success'] else 'FAIL'}</td></tr>"
    )


def conflicts_html(groups: list[dict[str, Any]], heading: str = "h2") -> str:
    """The quarantined label conflicts as a table (one row per file, grouped by content), or ""."""
    if not groups:
        return ""
    rows = "".join(
        f"<tr><td><code>{esc(str(g.get('sha256', ''))[:12])}</code></td><td>{esc(str(f.get('path', '')))}</td>"
        f"<td>{esc(str(f.get('label', '')))}</td></tr>"
        for g in groups
        for f in g.get("files", [])
    )
    return (f"<{heading}>Label conflicts (quarantined)</{heading}><p>Identical bytes under different labels: "
            f"every copy is left out of training and testing.</p><table><tr><th>content sha256</th><th>file</th>"
            f"<th>label</th></tr>{rows}</table>")


def render_html(report: QualityReport) -> str:
    """A self-contained HTML page of the report: no script, no external assets, data escaped.

    Besides the verdict, failures and statistics, each expectation's row shows its rule, what GX
    observed, how many values were unexpected and up to five of them (a value GX saw, such as a
    label outside data.allowed_labels, is data: it is escaped like everything else).
    """
    items = "".join(f"<li class='fail'>{esc(m)}</li>" for m in report.failures)
    items += "".join(f"<li class='warn'>{esc(m)}</li>" for m in report.warnings)

    def cell(v: Any) -> str:
        return esc(json.dumps(v, ensure_ascii=False) if isinstance(v, dict) else str(v))

    stats_rows = "".join(
        f"<tr><th>{esc(str(k))}</th><td>{cell(v)}</td></tr>"
        for k, v in report.statistics.items()
        if k not in ("images_per_class", "label_conflicts")
    )
    per_class = report.statistics.get("images_per_class", {})
    class_rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(str(v))}</td></tr>" for k, v in per_class.items())
    details = _expectation_details(report.result)
    check_rows = "".join(_check_row(c, details.get(str(c["check"]), {})) for c in report.result.get("checks", []))
    verdict = "<span class='ok'>PASSED</span>" if report.success else "<span class='bad'>FAILED</span>"
    body = f"""<h1>Data quality: {verdict}</h1>
<p>{len(report.failures)} failure(s), {len(report.warnings)} warning(s).</p>
<ul>{items}</ul>
<h2>Expectations</h2>
<table><tr><th>check</th><th>expectation</th><th>data</th><th>rule</th><th>observed</th>
<th>unexpected examples</th><th>severity</th><th>result</th></tr>{check_rows}</table>
{conflicts_html(report.statistics.get("label_conflicts") or [])}
<h2>Statistics</h2><table>{stats_rows}</table>
<h2>Ok images per class</h2><table><tr><th>class</th><th>images</th></tr>{class_rows}</table>"""
    return html_page("Data quality report", body, css=PAGE_CSS)
