"""Human approval before promotion: what the reviewer is shown, and what their answer does.

Optional (`gate.require_approval`, or the DAG's `require_approval` trigger param). When it is on
and the gate says promote, the DAG's ``release.approve`` task (a standard-provider HITLOperator)
asks an Airflow user, showing `request_body`; `apply_approval` then turns the answer into the
decision the promote step carries out and logs:

- Approve: promote, and the promotion log names who approved, when, and their comment;
- Reject: keep production, reason ``rejected by <user>: <comment>``;
- no answer within `gate.approval_timeout_hours`: keep production, ``no decision within 24 h``;
- no answer at all (a CLI run has no human to ask): keep production and say so.

The request body is Markdown, rendered by the Airflow UI. Everything in it that comes from data
(class labels in the gate's reasons, candidate names, run ids, URIs) goes through `md_text`, so
a hostile label cannot add a link, an image, a heading or HTML to the page a reviewer trusts.
This module imports no Airflow: the DAG reads the HITL answer and passes it here as a dict.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from ml.config import PipelineConfig

APPROVE = "Approve"
REJECT = "Reject"
OPTIONS = (APPROVE, REJECT)
# What the reviewer may type beside the button (a HITL form field) and what the log keeps of it.
COMMENT_PARAM = "comment"
MAX_COMMENT_CHARS = 2000
# The body lists the top of the leaderboard and the gate's reasons; a 1,000-class gate can give a
# reason per class, so both are capped (the run report has everything).
MAX_LEADERBOARD_ROWS = 10
MAX_REASONS = 20
MAX_FIELD_CHARS = 300

# HTML's metacharacters as entities (CommonMark decodes them back to text, never to markup);
# every other ASCII punctuation character is backslash-escaped, which CommonMark and GFM define
# for all of them: no emphasis, link, image, heading, list, table cell, code span or autolink
# (``http\://``, ``www\.``, ``a\@b``) can start inside escaped text.
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}
_BACKSLASHED = frozenset(string.punctuation) - set(_ENTITIES)


def md_text(value: Any, max_chars: int = MAX_FIELD_CHARS) -> str:
    """`value` as inert Markdown inline text: one line, no markup, HTML or link survives.

    Line breaks and other control characters become spaces (a new line could start a heading,
    a list or a table row); text longer than `max_chars` is cut with an ellipsis.
    """
    text = "" if value is None else str(value)
    text = "".join(" " if (ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0 or ch in "\u2028\u2029") else ch for ch in text)
    text = " ".join(text.split())
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return "".join(_ENTITIES.get(ch) or ("\\" + ch if ch in _BACKSLASHED else ch) for ch in text)


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def approval_required(decision: Mapping[str, Any], config: PipelineConfig) -> bool:
    """Whether a human must approve this run's promotion: approval is on and the gate says promote."""
    return bool(config.gate.require_approval and decision.get("promote"))


def hours_text(hours: float) -> str:
    """``24 h``, ``0.01 h``: the timeout as the reasons and the body spell it."""
    return f"{hours:g} h"


def request_subject(decision: Mapping[str, Any]) -> str:
    """The request's headline (plain text in the UI; Markdown-neutralised all the same)."""
    return f"Promote {md_text(decision.get('challenger'), 100)} to production?"


def request_body(decision: Mapping[str, Any], evaluation: Mapping[str, Any], *, run_id: str,
                 timeout_hours: float, report_uri: str | None = None, report_url: str | None = None,
                 approvers: Sequence[str] = ()) -> str:
    """The Markdown a reviewer decides on: leaderboard summary, the gate's reasons, the run report.

    Args:
        decision: the gate's decision (``challenger``, ``champion_version``, ``reasons``, scores).
        evaluation: the evaluate step's result (``leaderboard`` rows, ``production``'s scores).
        run_id: the DAG run.
        timeout_hours: how long the request waits before production is kept.
        report_uri: the run report's object-store URI (shown as text).
        report_url: a link to the run's registry page (built by the caller from trusted parts).
        approvers: who may respond (empty: any user with access).
    """
    rows = [r for r in evaluation.get("leaderboard", []) if isinstance(r, Mapping)]
    lines = [f"**Run** {md_text(run_id)}", "",
             f"The gate recommends promoting **{md_text(decision.get('challenger'))}** over "
             + (f"production **{md_text(decision['champion_version'])}**." if decision.get("champion_version")
                else "no production model (this would be the first)."), "",
             f"### Leaderboard (test split, {len(rows)} candidate{'' if len(rows) == 1 else 's'})", "",
             "| # | candidate | accuracy | top-5 | log loss | macro F1 | status |",
             "|---|---|---|---|---|---|---|"]
    for row in rows[:MAX_LEADERBOARD_ROWS]:
        rank = row.get("rank")
        lines.append(f"| {rank if isinstance(rank, int) else '–'} | {md_text(row.get('candidate'), 100)} | "
                     f"{_num(row.get('accuracy'))} | {_num(row.get('top5_accuracy'))} | {_num(row.get('log_loss'))} "
                     f"| {_num(row.get('macro_f1'))} | {md_text(row.get('status'), 40)} |")
    if len(rows) > MAX_LEADERBOARD_ROWS:
        lines.append(f"| | … {len(rows) - MAX_LEADERBOARD_ROWS} more in the run report | | | | | |")
    production = evaluation.get("production")
    if isinstance(production, Mapping):
        lines += ["", f"Production on the same test images: accuracy {_num(production.get('accuracy'))}, "
                      f"log loss {_num(production.get('log_loss'))}."]
    metric = md_text(decision.get("metric") or "accuracy", 40)
    lines += ["", "### Gate decision: promote", "",
              f"{metric}: challenger {_num(decision.get('challenger_score'))}, production "
              f"{_num(decision.get('champion_score'))}, delta {_num(decision.get('delta'), 4)}"
              + (" (forced)" if decision.get("forced") else ""), ""]
    reasons = [str(r) for r in decision.get("reasons", [])]
    lines += [f"- {md_text(reason)}" for reason in reasons[:MAX_REASONS]]
    if len(reasons) > MAX_REASONS:
        lines.append(f"- … {len(reasons) - MAX_REASONS} more in the run report")
    lines += ["", "### Run report", ""]
    if report_url:
        lines += [f"[Open the run in the model registry](<{_link_target(report_url)}>)", ""]
    if report_uri:
        lines.append(f"Stored at {md_text(report_uri, 500)}")
    lines += ["", "### Your decision", "",
              f"**{APPROVE}** publishes the challenger and moves production to it. **{REJECT}** keeps production. "
              f"No answer within {hours_text(timeout_hours)} keeps production. Your comment goes into the "
              "promotion log.",
              ]
    if approvers:
        lines += ["", "Who may answer: " + ", ".join(md_text(a, 100) for a in approvers)]
    return "\n".join(lines) + "\n"


def _link_target(url: str) -> str:
    """A link destination that cannot leave its angle brackets or change scheme: every byte outside
    the URL-safe set is percent-encoded (the caller builds `url` from the registry's own prefix)."""
    if not url.startswith(("/", "http://", "https://")):
        raise ValueError(f"not a registry link: {url!r}")
    return quote(url, safe="/:%~._-")


def assigned_users(config: PipelineConfig) -> list[dict[str, str]]:
    """The HITL request's respondents: one Airflow user per approver (id = name), none = anyone."""
    return [{"id": name, "name": name} for name in config.gate.approvers]


# --------------------------------------------------------------------------- the answer


def _iso(value: Any) -> str | None:
    if isinstance(value, datetime):
        return value.isoformat()
    return None if value is None else str(value)


def approval_record(response: Mapping[str, Any], timeout_hours: float) -> dict[str, Any]:
    """What the promotion log keeps of a HITL answer: outcome, who, when, comment.

    `response` is the HITL task's result: ``chosen_options``, ``params_input``, ``responded_at``
    and ``responded_by_user`` ({id, name}; None when the timeout chose the default, Reject).
    """
    user = response.get("responded_by_user")
    chosen = list(response.get("chosen_options") or [])
    comment = (response.get("params_input") or {}).get(COMMENT_PARAM)
    comment = None if comment in (None, "") else str(comment)[:MAX_COMMENT_CHARS]
    if not user:
        outcome = "timed out"
    elif chosen == [APPROVE]:
        outcome = "approved"
    else:
        outcome = "rejected"
    return {"outcome": outcome, "by": (user or {}).get("name") or (user or {}).get("id"),
            "by_id": (user or {}).get("id"), "at": _iso(response.get("responded_at")), "comment": comment,
            "timeout_hours": timeout_hours}


def apply_approval(decision: Mapping[str, Any], response: Mapping[str, Any] | None,
                   config: PipelineConfig) -> dict[str, Any]:
    """The decision the promote step carries out, given the gate's `decision` and the human's answer.

    Approval off and no answer, or a gate that says keep: the gate's decision, unchanged. An answer
    is always honoured (a Reject keeps production even if approval was turned off since). Approval
    on, the gate says promote and there is no answer (a run without Airflow): keep production.
    """
    out = dict(decision)
    if not out.get("promote"):
        return out
    hours = config.gate.approval_timeout_hours
    if response is None:
        if not config.gate.require_approval:
            return out
        reason = ("human approval is required (gate.require_approval) and nobody approved: production kept; "
                  "run the Airflow DAG to ask a reviewer (release.approve)")
        return {**out, "promote": False, "reasons": [reason, *out.get("reasons", [])],
                "approval": {"outcome": "not asked", "by": None, "by_id": None, "at": None, "comment": None,
                             "timeout_hours": hours}}
    record = approval_record(response, hours)
    out["approval"] = record
    if record["outcome"] == "approved":
        said = f"approved by {record['by']}" + (f": {record['comment']}" if record["comment"] else "")
        return {**out, "reasons": [*out.get("reasons", []), said]}
    if record["outcome"] == "timed out":
        reason = f"no decision within {hours_text(hours)}: production kept"
    else:
        reason = f"rejected by {record['by']}: {record['comment'] or '(no comment)'}"
    return {**out, "promote": False, "reasons": [reason, *out.get("reasons", [])]}


def stale_approval(decision: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any] | None:
    """The re-gate's answer when production moved while a human was asked: keep (they approved replacing
    the champion they were shown, not `current`); None when nobody was asked (re-gate as usual)."""
    if not decision.get("approval"):
        return None
    return {**decision, "promote": False, "reasons": [
        f"production moved to {current.get('version')} while this run awaited approval; the approval was for "
        f"replacing {decision.get('champion_version') or 'no production model'}: production kept"]}


def approval_summary(record: Mapping[str, Any] | None) -> str:
    """One line for pages and the CLI: ``approved by bob at 2026-12-02T15:00:00+00:00: looks good``."""
    if not record:
        return ""
    outcome = str(record.get("outcome") or "")
    if outcome == "timed out":
        return f"no decision within {hours_text(float(record.get('timeout_hours') or 0))}"
    if outcome == "not asked":
        return "approval required, nobody asked (no Airflow)"
    text = f"{outcome} by {record.get('by')}"
    if record.get("at"):
        text += f" at {record['at']}"
    if record.get("comment"):
        text += f": {record['comment']}"
    return text
