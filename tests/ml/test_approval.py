"""Human approval before promotion: the request a reviewer sees, its Markdown safety, the config,
what each answer does, and what the promotion log and the registry page keep of it."""

from __future__ import annotations

import json
import string
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from ml.config import GateConfig, PipelineConfig, overrides_from_params
from ml.errors import ConfigError
from ml.registry.approval import (
    apply_approval,
    approval_summary,
    assigned_users,
    md_text,
    request_body,
)

MODEL = "dogs"
RUN_ID = "manual__2026-12-02T15:00:00+00:00"
HOSTILE = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "[click me](javascript:alert(1))",
    "![pixel](http://evil.example/p.png)",
    "# Approved by security\n\n- [ ] sure",
    "**APPROVE NOW**",
    "col | injected | cells",
    "`code` ~~gone~~ _em_",
    "http://evil.example/autolink www.evil.example a@evil.example",
    "<http://evil.example>",
    "&lt;b&gt; already escaped &amp;",
    "back\\slash\\*",
    "1. numbered\r\n> quoted",
]


def _config(**gate: Any) -> PipelineConfig:
    return PipelineConfig.from_dict({"gate": gate})


def _decision(promote: bool = True, label: str = "poodle", challenger: str = "scratch_small") -> dict[str, Any]:
    return {"promote": promote, "challenger": challenger, "champion_version": "20261201T000000Z-abc123",
            "metric": "accuracy", "challenger_score": 0.8125, "champion_score": 0.75, "delta": 0.0625,
            "reasons": ["challenger accuracy 0.812 beats production 0.750 by 0.062 (min_delta 0.010)",
                        f"recall of class {label} 0.600 vs 0.700: drop 0.100 within 0.250"]}


def _evaluation(candidate: str = "scratch_small") -> dict[str, Any]:
    return {"best": candidate, "production": {"accuracy": 0.75, "log_loss": 0.9},
            "leaderboard": [{"rank": 1, "candidate": candidate, "accuracy": 0.8125, "top5_accuracy": 1.0,
                             "log_loss": 0.5, "macro_f1": 0.8, "status": "ok"},
                            {"rank": 2, "candidate": "transfer_mobilenet", "accuracy": 0.5, "top5_accuracy": 0.9,
                             "log_loss": 1.2, "macro_f1": 0.45, "status": "ok"}]}


def _response(option: str | None, user: str | None = "bob", comment: str | None = None) -> dict[str, Any]:
    """What the HITL task returns (HITLTriggerEventSuccessPayload); user None: the timeout chose the default."""
    return {"chosen_options": [option] if option else ["Reject"], "params_input": {"comment": comment},
            "responded_at": datetime(2026, 12, 2, 15, 30, tzinfo=UTC),
            "responded_by_user": {"id": user, "name": user} if user else None}


# --------------------------------------------------------------------------- the request body


def _markdown():
    """A CommonMark renderer with raw HTML on and GFM tables (what the Airflow UI's Markdown allows, and more)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _render(markdown: str) -> _Tags:
    parsed = _Tags()
    parsed.feed(_markdown().render(markdown))
    return parsed


def test_body_shows_the_leaderboard_the_gate_reasons_with_numbers_and_the_run_report() -> None:
    body = request_body(_decision(), _evaluation(), run_id=RUN_ID, timeout_hours=24,
                        report_uri="s3://ml-models/dogs/runs/x/report.html",
                        report_url="http://127.0.0.1:8080/model-registry/runs/x", approvers=["alice", "bob"])
    page = _render(body)
    text = " ".join(page.text)

    assert "scratch_small" in text and "transfer_mobilenet" in text
    assert "0.812" in text and "0.500" in text  # leaderboard numbers
    assert "Production on the same test images: accuracy 0.750" in text
    assert "challenger accuracy 0.812 beats production 0.750 by 0.062 (min_delta 0.010)" in text
    assert "recall of class poodle 0.600 vs 0.700" in text
    assert "challenger 0.812, production 0.750, delta 0.0625" in text
    assert "s3://ml-models/dogs/runs/x/report.html" in text
    assert ("a", {"href": "http://127.0.0.1:8080/model-registry/runs/x"}) in page.tags
    assert "No answer within 24 h keeps production" in text
    assert "Who may answer: alice, bob" in text
    assert [tag for tag, _ in page.tags].count("table") == 1


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_labels_candidates_and_run_ids_stay_plain_text(hostile: str) -> None:
    """Everything from data renders as the literal text it is: no link, image, heading, emphasis, HTML, cell."""
    safe = request_body(_decision(), _evaluation(), run_id=RUN_ID, timeout_hours=24,
                        report_uri="s3://b/report.html", report_url="/model-registry/runs/x", approvers=["alice"])
    body = request_body(_decision(label=hostile, challenger=hostile), _evaluation(candidate=hostile),
                        run_id=hostile, timeout_hours=24, report_uri=f"s3://b/{hostile}/report.html",
                        report_url="/model-registry/runs/x", approvers=[hostile])
    page, reference = _render(body), _render(safe)

    # The hostile strings added no element: the same tags, in the same numbers, as with harmless names.
    assert [tag for tag, _ in page.tags] == [tag for tag, _ in reference.tags]
    assert [attrs for tag, attrs in page.tags if tag == "a"] == [{"href": "/model-registry/runs/x"}]
    flat = " ".join(" ".join(page.text).split())
    assert " ".join(hostile.split()) in flat  # shown as written (line breaks become spaces)


@pytest.mark.parametrize("text", [string.punctuation, string.punctuation[::-1] + " x " + string.ascii_letters,
                                  "a\\*b\\\\c", "&amp;&#x3C;", "\u2028# x\u0007", "  spaced   out  "])
def test_md_text_renders_back_to_the_same_text(text: str) -> None:
    page = _render(md_text(text))

    assert [tag for tag, _ in page.tags] == ["p"]
    expected = " ".join("".join(" " if ord(c) < 32 or c == "\u2028" else c for c in text).split())
    assert "".join(page.text).strip() == expected


def test_md_text_caps_long_values() -> None:
    assert md_text("x" * 1000, max_chars=50) == "x" * 49 + "…"


def test_report_link_must_be_a_registry_url() -> None:
    with pytest.raises(ValueError, match="not a registry link"):
        request_body(_decision(), _evaluation(), run_id=RUN_ID, timeout_hours=1, report_url="javascript:alert(1)")


# --------------------------------------------------------------------------- configuration


def test_approval_is_off_by_default_with_a_24_hour_timeout_and_any_approver() -> None:
    gate = PipelineConfig.load().gate  # config/pipeline.yaml documents the same defaults

    assert (gate.require_approval, gate.approval_timeout_hours, gate.approvers) == (False, 24.0, ())
    assert (GateConfig().require_approval, GateConfig().approval_timeout_hours) == (False, 24.0)


@pytest.mark.parametrize("hours", [0, -1, 0.0, "24", True, float("nan"), float("inf"), None])
def test_a_timeout_that_is_not_a_positive_number_of_hours_is_a_config_error(hours: Any) -> None:
    with pytest.raises(ConfigError, match=r"gate\.approval_timeout_hours must be a number of hours > 0, got"):
        _config(approval_timeout_hours=hours)


@pytest.mark.parametrize("approvers", ["bob", ["bob", ""], [" bob"], ["bob", "bob"], [3]])
def test_bad_approvers_are_a_config_error(approvers: Any) -> None:
    with pytest.raises(ConfigError, match=r"gate\.approvers"):
        _config(approvers=approvers)


def test_require_approval_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match=r"gate\.require_approval must be true or false, got 'yes'"):
        _config(require_approval="yes")


def test_approvers_become_assigned_users() -> None:
    config = _config(require_approval=True, approvers=["alice", "bob"], approval_timeout_hours=0.01)

    assert config.gate.approvers == ("alice", "bob")
    assert config.gate.approval_timeout_hours == 0.01
    assert assigned_users(config) == [{"id": "alice", "name": "alice"}, {"id": "bob", "name": "bob"}]
    assert assigned_users(_config()) == []


@pytest.mark.parametrize(("param", "expected"), [(None, None), (True, True), (False, False)])
def test_the_trigger_param_overrides_the_config_only_when_set(param: bool | None, expected: bool | None) -> None:
    overrides = overrides_from_params({"require_approval": param})

    assert overrides.get("gate", {}).get("require_approval") == expected


# --------------------------------------------------------------------------- what each answer does


def test_approval_off_leaves_the_gate_decision_alone() -> None:
    assert apply_approval(_decision(), None, _config()) == _decision()


def test_a_gate_that_keeps_production_needs_nobody() -> None:
    keep = _decision(promote=False)

    assert apply_approval(keep, None, _config(require_approval=True)) == keep


def test_approve_promotes_and_records_who_when_and_why() -> None:
    out = apply_approval(_decision(), _response("Approve", comment="ship it"), _config(require_approval=True))

    assert out["promote"] is True
    assert out["reasons"][-1] == "approved by bob: ship it"
    assert out["approval"] == {"outcome": "approved", "by": "bob", "by_id": "bob",
                               "at": "2026-12-02T15:30:00+00:00", "comment": "ship it", "timeout_hours": 24.0}


def test_reject_keeps_production_with_the_reviewers_reason() -> None:
    out = apply_approval(_decision(), _response("Reject", comment="too risky before the holidays"),
                         _config(require_approval=True))

    assert out["promote"] is False
    assert out["reasons"][0] == "rejected by bob: too risky before the holidays"
    assert out["approval"]["outcome"] == "rejected" and out["approval"]["by"] == "bob"


def test_reject_without_a_comment_says_so() -> None:
    out = apply_approval(_decision(), _response("Reject"), _config(require_approval=True))

    assert out["reasons"][0] == "rejected by bob: (no comment)"


def test_no_answer_within_the_timeout_keeps_production() -> None:
    out = apply_approval(_decision(), _response(None, user=None), _config(require_approval=True))

    assert out["promote"] is False
    assert out["reasons"][0] == "no decision within 24 h: production kept"
    assert out["approval"]["outcome"] == "timed out" and out["approval"]["by"] is None
    short = apply_approval(_decision(), _response(None, user=None),
                           _config(require_approval=True, approval_timeout_hours=0.01))
    assert short["reasons"][0] == "no decision within 0.01 h: production kept"


def test_approval_required_and_nobody_asked_keeps_production() -> None:
    """The CLI path: no human, so no promotion, and the reason says why."""
    out = apply_approval(_decision(), None, _config(require_approval=True))

    assert out["promote"] is False
    assert out["reasons"][0].startswith("human approval is required (gate.require_approval) and nobody approved")
    assert out["approval"]["outcome"] == "not asked"


def test_an_answer_is_honoured_even_if_approval_was_turned_off_since() -> None:
    out = apply_approval(_decision(), _response("Reject", comment="no"), _config())

    assert out["promote"] is False and out["reasons"][0] == "rejected by bob: no"


def test_approval_summary_lines() -> None:
    approved = {"outcome": "approved", "by": "bob", "at": "T", "comment": "ok"}
    assert approval_summary(approved) == "approved by bob at T: ok"
    assert approval_summary({"outcome": "timed out", "timeout_hours": 24.0}) == "no decision within 24 h"
    assert approval_summary(None) == ""


# --------------------------------------------------------------------------- the request from the pipeline


def test_approval_stage_asks_only_when_approval_is_on_and_the_gate_promotes(tmp_path: Path) -> None:
    from ml.pipeline import approval_stage

    on = PipelineConfig.from_dict({"work_dir": str(tmp_path), "gate": {
        "require_approval": True, "approval_timeout_hours": 2.5, "approvers": ["alice"]}})
    dataset = {"dataset_hash": "d" * 64, "labels": ["a", "b"]}

    assert approval_stage(dataset, _evaluation(), _decision(), _config(), None, RUN_ID) == {}
    assert approval_stage(dataset, _evaluation(), _decision(promote=False), on, None, RUN_ID) == {}
    request = approval_stage(dataset, _evaluation(), _decision(), on, None, RUN_ID,
                             registry_url="http://127.0.0.1:8080/model-registry")

    assert request["timeout_hours"] == 2.5
    assert request["assigned_users"] == [{"id": "alice", "name": "alice"}]
    assert request["subject"] == "Promote scratch\\_small to production?"
    segment = "manual__2026-12-02T15~3a00~3a00~2b00~3a00"
    assert f"[Open the run in the model registry](<http://127.0.0.1:8080/model-registry/runs/{segment}>)" \
        in request["body"]
    # The run report exists before anyone is asked, marked as awaiting approval.
    [report_file] = tmp_path.rglob("report.json")
    decision = json.loads(report_file.read_text())["decision"]
    assert decision["awaiting_approval"] is True
    assert decision["reasons"][-1] == "awaiting human approval (Airflow: Required Actions)"


# --------------------------------------------------------------------------- promotion log and registry page


def _publish(store: Any, tmp_path: Path, version: str) -> None:
    from ml.registry import versions as v

    folder = tmp_path / version
    folder.mkdir()
    (folder / "model.keras").write_bytes(b"weights" * 100)
    (folder / "labels.json").write_text('["cat", "dog"]')
    v.publish_version(store, MODEL, version, {"model.keras": folder / "model.keras",
                                              "labels.json": folder / "labels.json"},
                      {"metrics": {"accuracy": 0.8}, "labels": ["cat", "dog"], "run_id": RUN_ID,
                       "dataset_hash": "d" * 64, "candidate": "scratch_small"})


def test_the_promotion_log_and_the_registry_page_name_the_approver_and_the_rejecter(store: Any,
                                                                                    tmp_path: Path) -> None:
    from ml.registry.browser import render_overview
    from ml.registry.promotion import keep_production, move_pointer
    from ml.registry.versions import promotion_history
    from tests.html_safety import assert_escaped, assert_safe

    config = _config(require_approval=True)
    hostile = "<img src=x onerror=alert(1)>"
    _publish(store, tmp_path, "v1")
    approved = apply_approval({**_decision(), "champion_version": None, "expected_etag": None},
                              _response("Approve", user="alice", comment=f"fine {hostile}"), config)
    move_pointer(store, MODEL, "v1", approved, RUN_ID, actor="airflow:test", regate=lambda current: {})
    rejected = apply_approval(_decision(), _response("Reject", user="bob", comment="not now"), config)
    keep_production(store, MODEL, rejected, "manual__second", actor="airflow:test")

    first, second = promotion_history(store, MODEL)
    assert first["action"] == "promote" and first["to"] == "v1"
    assert first["approval"] == {"outcome": "approved", "by": "alice", "by_id": "alice",
                                 "at": "2026-12-02T15:30:00+00:00", "comment": f"fine {hostile}",
                                 "timeout_hours": 24.0}
    assert second["action"] == "keep" and second["reasons"][0] == "rejected by bob: not now"
    assert second["approval"]["by"] == "bob" and second["approval"]["comment"] == "not now"

    page = render_overview(store, MODEL, base_url="/model-registry")
    assert "approved by alice at 2026-12-02T15:30:00+00:00: fine" in page
    assert "rejected by bob at 2026-12-02T15:30:00+00:00: not now" in page
    assert_safe(page, source="registry overview")
    assert_escaped(page, hostile, source="registry overview")


def test_the_cli_says_why_production_stayed_when_approval_is_required(capsys: pytest.CaptureFixture) -> None:
    from ml.cli import _say_if_approval_blocked

    kept = apply_approval(_decision(), None, _config(require_approval=True))
    _say_if_approval_blocked({"promoted": False, "version": "v1", "decision": kept})
    _say_if_approval_blocked({"promoted": True, "version": "v2", "decision": _decision()})

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("production kept (v1): the gate would promote scratch_small, but gate.require_approval "
                             "is on and a command-line run has nobody to approve it.")


def test_the_run_page_shows_awaiting_approval_then_who_decided(store: Any) -> None:
    from ml.registry.browser import render_run
    from ml.registry.layout import REPORT_FILE, run_key, run_segment
    from tests.html_safety import assert_escaped, assert_safe

    hostile = "<script>alert(1)</script>"
    key = run_key(MODEL, RUN_ID, REPORT_FILE)
    store.put_json(key, {"leaderboard": [], "decision": {**_decision(), "promoted": False, "awaiting_approval": True}})
    waiting = render_run(store, MODEL, run_segment(RUN_ID), base_url="/model-registry")
    rejected = apply_approval(_decision(), _response("Reject", user="bob", comment=hostile),
                              _config(require_approval=True))
    store.put_json(key, {"leaderboard": [], "decision": {**rejected, "promoted": False}})
    decided = render_run(store, MODEL, run_segment(RUN_ID), base_url="/model-registry")

    assert "awaiting human approval" in waiting and "production kept" not in waiting
    assert "production kept" in decided and "human approval: <span class='no'>rejected by bob at " in decided
    assert_safe(decided, source="run page")
    assert_escaped(decided, hostile, source="run page")


def test_an_approval_does_not_carry_over_to_a_champion_the_reviewer_never_saw(store: Any, tmp_path: Path) -> None:
    """Another promotion wins the pointer race while this run waits: the re-gate keeps production."""
    from ml.registry.approval import stale_approval
    from ml.registry.promotion import move_pointer
    from ml.registry.versions import promote, promotion_history, read_pointer

    for version in ("v0", "v1"):
        _publish(store, tmp_path, version)
    approved = apply_approval({**_decision(), "champion_version": None, "expected_etag": None},
                              _response("Approve", user="alice"), _config(require_approval=True))
    promote(store, MODEL, "v0", expected_etag=None, actor="rival", reason="won the race")  # after the gate read

    result = move_pointer(store, MODEL, "v1", approved, RUN_ID, actor="airflow:test",
                          regate=lambda current: stale_approval(approved, current) or pytest.fail("re-gated"))

    assert result["promoted"] is False
    assert read_pointer(store, MODEL)[0]["version"] == "v0"
    entry = [e for e in promotion_history(store, MODEL) if e.get("run_id") == RUN_ID][-1]
    assert entry["action"] == "keep" and entry["approval"]["by"] == "alice"
    assert "production moved to v0 while this run awaited approval" in " ".join(entry["reasons"])
    assert stale_approval(_decision(), {"version": "v0"}) is None  # nobody asked: re-gate as usual
