"""The promotion protocol: claim a version id, publish it once, move the pointer, log every outcome.

A run's promote may be retried or cleared after a store death mid-upload or at the pointer swap.
`claim_version` makes every try of one run publish under the same version id (recorded in
``runs/<run>/promotion.json``), so retries leave no stray versions; `move_pointer` swaps
``production.json`` with a conditional write and, when another promotion won the race, re-gates
against the new champion once (through the caller's `regate`) before trying again; every outcome
(promote, keep, lost race) goes into the append-only promotion log exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ml.errors import PromotionConflict
from ml.registry import layout
from ml.registry.versions import (
    append_promotion_log,
    is_complete,
    make_pointer,
    new_version_id,
    promotion_history,
    read_pointer,
    read_version,
    swap_pointer,
    version_prefix,
)

if TYPE_CHECKING:
    from ml.registry.store import ObjectStore

log = logging.getLogger(__name__)

Regate = Callable[[Mapping[str, Any]], dict[str, Any]]  # the new champion's pointer -> a gate decision


def claim_version(store: ObjectStore, model_name: str, run_id: str,
                  challenger: str) -> tuple[str, dict[str, Any] | None]:
    """The version id this run's promotion publishes, the same for every try of the task.

    A retried or cleared `promote` takes over what an earlier try claimed: a COMPLETE version is
    reused as it is (returned with its info: nothing to upload again); an unfinished one is
    deleted -- no reader takes a version without COMPLETE and `swap_pointer` refuses it -- and
    published again under the same id.

    Returns:
        (version, its info if it is already complete, else None).
    """
    key = layout.run_key(model_name, run_id, layout.CLAIM_FILE)
    claim = store.get_json(key) if store.exists(key) else None
    if claim is not None:
        version = str(claim["version"])
        if is_complete(store, model_name, version):
            if claim.get("challenger") == challenger:
                info = read_version(store, model_name, version)
                log.info("promote: reusing version %s, published by an earlier try of this run", version)
                return version, {"uri": info["uri"], "sha256": info["sha256"],
                                 "metrics": info["metadata"].get("metrics", {}),
                                 "labels": info["metadata"].get("labels", [])}
        else:
            removed = store.delete_prefix(version_prefix(model_name, version))
            log.info("promote: deleted %d objects of version %s, left unfinished by an earlier try", removed, version)
            if claim.get("challenger") == challenger:
                return version, None
    version = new_version_id(datetime.now(UTC))
    store.put_json(key, {"version": version, "challenger": challenger, "claimed_at": datetime.now(UTC).isoformat()})
    return version, None


def log_outcome(store: ObjectStore, model_name: str, run_id: str, actor: str, current: str | None,
                challenger_version: str | None, *, promoted: bool, reasons: list[str],
                approval: Mapping[str, Any] | None = None) -> None:
    """One promotion-log entry for a gate outcome that did not move the pointer (keep, lost race)."""
    target = challenger_version if promoted else current
    append_promotion_log(store, model_name, {
        "at": datetime.now(UTC).isoformat(), "action": "promote" if promoted else "keep",
        "version": target or "none", "from": current, "to": target, "run_id": run_id, "actor": actor,
        "reasons": reasons, **_approval_field(approval),
    })


def _approval_field(approval: Mapping[str, Any] | None) -> dict[str, Any]:
    """The human decision (ml.registry.approval.approval_record) of a log entry, when one was asked for."""
    return {"approval": dict(approval)} if approval else {}


def promotion_logged(store: ObjectStore, model_name: str, run_id: str, version: str) -> bool:
    """Whether the promotion log already records this run moving production to `version`."""
    return any(e.get("action") == "promote" and e.get("run_id") == run_id and e.get("to") == version
               for e in promotion_history(store, model_name))


def move_pointer(store: ObjectStore, model_name: str, version: str, decision: Mapping[str, Any], run_id: str, *,
                 actor: str, regate: Regate) -> dict[str, Any]:
    """Point production at the published `version` if the pointer is still what the gate read.

    Args:
        decision: the gate's decision (``challenger``, ``reasons``, ``champion_version``,
            ``expected_etag``: the pointer's ETag when the gate read it).
        regate: called with the new champion's pointer when another promotion won the race.

    Returns:
        {"promoted": bool, "version", "uri", "version_uri", "decision", ["reason"]}.

    Raises:
        PromotionConflict: the pointer moved twice under us, or was deleted.
    """
    decision = dict(decision)
    result: dict[str, Any] = {"promoted": False, "decision": decision}
    expected = decision.get("expected_etag")
    for attempt in (1, 2):
        resumed = False
        pointer = make_pointer(store, model_name, version, candidate=decision["challenger"])
        try:
            swap_pointer(store, model_name, pointer, expected_etag=expected)
        except PromotionConflict as conflict:
            current, expected = read_pointer(store, model_name)
            if current is None or current.get("version") != version:
                log.warning("promote: %s", conflict)
                if attempt == 2 or current is None:
                    raise
                regated = regate(current)
                log_outcome(store, model_name, run_id, actor, decision.get("champion_version"), version,
                            promoted=False, reasons=[f"lost the pointer race to {current['version']}"]
                            + regated["reasons"], approval=decision.get("approval"))
                if not regated["promote"]:
                    log.info("promote: keeping %s: %s", current["version"], "; ".join(regated["reasons"]))
                    return {**result, "decision": regated,
                            "reason": f"re-gated against the new champion {current['version']} and lost"}
                decision = {**decision, **regated, "champion_version": current["version"]}
                continue
            # An earlier try of this run moved the pointer, then died before it could say so.
            log.info("promote: production is already at %s (moved by an earlier try of this run)", version)
            pointer, resumed = current, True
        # A swap that succeeded just now cannot be in the log yet; one an earlier try made may be.
        if not resumed or not promotion_logged(store, model_name, run_id, version):
            append_promotion_log(store, model_name, {
                "at": pointer["promoted_at"], "action": "promote", "version": version,
                "from": decision.get("champion_version"), "to": version, "run_id": run_id, "actor": actor,
                "candidate": decision["challenger"], "reasons": list(decision["reasons"]),
                **_approval_field(decision.get("approval")),
            })
        log.info("promote: production is now %s (%s)", version, pointer.get("version_uri"))
        return {**result, "decision": decision, "promoted": True, "version": version, "uri": pointer["uri"],
                "version_uri": pointer.get("version_uri")}
    raise AssertionError("unreachable: the second attempt returns or raises")  # pragma: no cover


def keep_production(store: ObjectStore, model_name: str, decision: Mapping[str, Any], run_id: str, *,
                    actor: str) -> dict[str, Any]:
    """The gate said keep: log it and say what production stays."""
    current, _ = read_pointer(store, model_name)
    version = current["version"] if current else None
    log_outcome(store, model_name, run_id, actor, version, None, promoted=False, reasons=list(decision["reasons"]),
                approval=decision.get("approval"))
    reason = "; ".join(decision["reasons"])
    log.info("promote: production unchanged (%s): %s", version, reason)
    return {"promoted": False, "decision": dict(decision), "reason": reason, "version": version,
            "uri": current["uri"] if current else None}
