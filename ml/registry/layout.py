"""The object-store layout: every key the pipeline writes or reads, and the names inside them.

One module owns the key scheme, so a reader and a writer can never disagree about it, and every
name that becomes part of a key or a local path is checked *where it is read* -- from the config,
the command line, an Airflow run id, or an object listing of a store someone else may control::

    <model>/runs/<run segment>/<candidate>/...      every candidate of every run
    <model>/runs/<run segment>/...                  run-level artifacts (quality/, leaderboard/, reports)
    <model>/runs/<run segment>/checkpoints/<candidate>/   per-epoch training state (latest.json last)
    <model>/versions/<version>/...                  immutable once COMPLETE
    <model>/production.json                         the pointer
    <model>/promotions/<utc-timestamp>-<version>.json   append-only log

Run ids are Airflow's (``manual__2026-11-23T17:05:01.123456+00:00``): `run_segment` maps them to a
key segment that is collision-free and reversible (`run_id_from_segment`), unlike replacing
``:`` and ``+`` with ``_``, which made two run ids share one prefix.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import PurePosixPath

from ml.errors import UnsafeNameError

# Airflow's dag_run.run_id column is String(250); the CLI's ids follow the same bound.
RUN_ID_MAX_CHARS = 250
# A plain name: one path segment, no leading symbol (so never "." or ".." or a hidden file).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Characters a run segment keeps as they are; every other UTF-8 byte becomes "~hh".
_RUN_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_RUN_SEGMENT_RE = re.compile(r"^(?:[A-Za-z0-9_.-]|~[0-9a-f]{2})+$")
# A relative file path inside a candidate or version folder: a few plain segments.
MAX_RELATIVE_DEPTH = 8


def check_name(value: object, what: str) -> str:
    """`value` if it is a plain name (letters, digits, '.', '_', '-'; at most 128; no leading symbol).

    Raises:
        UnsafeNameError: naming `what` and the value.
    """
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise UnsafeNameError(
            f"invalid {what} {_shown(value)}: use letters, digits, '.', '_' and '-' (at most 128 characters, "
            "not starting with a symbol)"
        )
    return value


def is_name(value: object) -> bool:
    """Whether `value` passes `check_name`."""
    return isinstance(value, str) and bool(_NAME_RE.match(value))


def check_version(version: object) -> str:
    """A version id as read from a pointer, a log entry, a listing or the command line."""
    return check_name(version, "version id")


def check_candidate(candidate: object) -> str:
    """A candidate name that the architecture registry knows (scratch_*, transfer_*, finetune_*)."""
    from ml.models.registry import parse_candidate

    name = check_name(candidate, "candidate name")
    parse_candidate(name)  # UnknownArchitectureError listing the known names
    return name


def check_run_id(run_id: object) -> str:
    """A run id: 1 to 250 printable characters (any of them; `run_segment` makes it key-safe)."""
    if not isinstance(run_id, str) or not run_id or len(run_id) > RUN_ID_MAX_CHARS:
        raise UnsafeNameError(f"invalid run id {_shown(run_id)}: expected 1 to {RUN_ID_MAX_CHARS} characters")
    if not run_id.isprintable():
        raise UnsafeNameError(f"invalid run id {_shown(run_id)}: control characters are not allowed")
    return run_id


def run_segment(run_id: str) -> str:
    """The key/folder segment of a run id: reversible and collision-free.

    Letters, digits, '_', '-' and '.' stay (a leading '.' does not); every other UTF-8 byte is
    written ``~hh`` (lower-case hex), '~' itself included, so distinct run ids never share a segment
    and the result is safe in S3 keys, URLs and file names.
    """
    check_run_id(run_id)
    out = []
    for i, char in enumerate(run_id):
        if char in _RUN_SAFE and not (i == 0 and char == "."):
            out.append(char)
        else:
            out.extend(f"~{byte:02x}" for byte in char.encode("utf-8"))
    return "".join(out)


def run_id_from_segment(segment: str) -> str:
    """The run id a segment stands for (the inverse of `run_segment`); UnsafeNameError otherwise.

    Only the canonical encoding is accepted, so each run id has exactly one segment. Folders
    written before this scheme (``manual__2026-11-23T17_05_01...``) decode to themselves.
    """
    if not isinstance(segment, str) or not _RUN_SEGMENT_RE.match(segment):
        raise UnsafeNameError(f"invalid run segment {_shown(segment)}: not a run folder name")
    raw = bytearray()
    i = 0
    while i < len(segment):
        if segment[i] == "~":
            raw.append(int(segment[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(segment[i].encode("ascii"))
            i += 1
    try:
        run_id = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafeNameError(f"invalid run segment {_shown(segment)}: not UTF-8 once decoded") from None
    if run_segment(run_id) != segment:
        raise UnsafeNameError(f"invalid run segment {_shown(segment)}: not the canonical encoding of a run id")
    return run_id


def check_relative_path(rel: object, what: str) -> PurePosixPath:
    """A file path inside a folder: 1 to 8 plain-name segments joined by '/'.

    Used for keys listed under a candidate or version prefix and for file names a version.json
    lists, before anything is written locally: a crafted ``../../x`` or ``/etc/x`` never leaves
    the destination folder.
    """
    if not isinstance(rel, str) or not rel:
        raise UnsafeNameError(f"invalid {what} {_shown(rel)}: empty")
    parts = rel.split("/")
    if len(parts) > MAX_RELATIVE_DEPTH:
        raise UnsafeNameError(f"invalid {what} {_shown(rel)}: deeper than {MAX_RELATIVE_DEPTH} folders")
    for part in parts:
        check_name(part, f"{what} segment")
    return PurePosixPath(*parts)


# -- names of the objects inside the folders ---------------------------------------------------------

# A candidate folder: these files, then the marker, written last (a reader that sees it sees all).
CANDIDATE_FILES = ("model.keras", "labels.json", "preprocessing.json", "history.csv")
CANDIDATE_MARKER = "train_summary.json"
# What evaluation adds to a candidate folder (metrics.json last).
METRICS_FILE = "metrics.json"
EVAL_FILES = ("confusion.png", "confusion.csv", "curves.png", "predictions.npz", METRICS_FILE)
TENSORBOARD_DIR = "tensorboard"
# Run-level files and folders.
QUALITY_DIR = "quality"
LEADERBOARD_DIR = "leaderboard"
FAILURES_DIR = "failures"
DRIFT_FILE = "drift.json"
GATE_FILE = "gate.json"
CLAIM_FILE = "promotion.json"  # the version id a run's promote claimed, the same for every try
REPORT_FILE = "report.json"
# Hyperparameter search: search/rung-<r>/<trial>.json (a trial's result at rung r, written after its
# candidate folder) and search/survivors-<r>.json (who goes on after rung r).
SEARCH_DIR = "search"
# A version folder: COMPLETE is written last and is what makes a version exist.
MODEL_FILE = "model.keras"
VERSION_FILE = "version.json"
SUBMISSION_FILE = "submission.csv"  # Kaggle-competition datasets only: the version's predictions of test/
COMPLETE_MARKER = "COMPLETE"
# The promotion log's key prefix: lexicographic order = chronological order.
LOG_TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"


# A candidate's training checkpoints: one state object per saved epoch, then the pointer naming the
# latest complete one (written last; a reader trusts only the object it names, after its sha256).
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_POINTER = "latest.json"


# A dataset snapshot (content-addressed by its dataset hash): packs of images, the manifest, the
# dataset description, the pack index; COMPLETE written last.
SNAPSHOT_INDEX = "snapshot.json"
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


# -- keys -------------------------------------------------------------------------------------------


def model_root(model_name: str) -> str:
    """``<model>/``."""
    return f"{check_name(model_name, 'model name')}/"


def runs_root(model_name: str) -> str:
    """``<model>/runs/``: one folder per run."""
    return f"{model_root(model_name)}runs/"


def run_prefix(model_name: str, run_id: str) -> str:
    """``<model>/runs/<run segment>`` (no trailing slash)."""
    return f"{runs_root(model_name)}{run_segment(run_id)}"


def candidate_prefix(model_name: str, run_id: str, candidate: str) -> str:
    """``<model>/runs/<run segment>/<candidate>/``."""
    return f"{run_prefix(model_name, run_id)}/{check_candidate(candidate)}/"


def checkpoint_prefix(model_name: str, run_id: str, candidate: str) -> str:
    """``<model>/runs/<run segment>/checkpoints/<candidate>/``: a candidate's resumable training state."""
    return f"{run_prefix(model_name, run_id)}/{CHECKPOINTS_DIR}/{check_candidate(candidate)}/"


def checkpoint_state_name(epochs_done: int) -> str:
    """The state object saved after `epochs_done` completed epochs (``epoch-00003.npz``)."""
    if not isinstance(epochs_done, int) or epochs_done < 1:
        raise UnsafeNameError(f"invalid checkpoint epoch {_shown(epochs_done)}: expected an integer >= 1")
    return f"epoch-{epochs_done:05d}.npz"


def folder_prefix(root: str, segment: str) -> str:
    """``<root><segment>/``: a folder found by listing `root` (a run or version folder of any age).

    Retention deletes folders by the names it listed; the segment must still be one path segment.
    """
    if not segment or "/" in segment or segment in (".", ".."):
        raise UnsafeNameError(f"invalid folder name {_shown(segment)} under {root}")
    return f"{root}{segment}/"


def run_key(model_name: str, run_id: str, *parts: str) -> str:
    """``<model>/runs/<run segment>/<part>/...``: a run-level object (each part a plain name)."""
    return "/".join([run_prefix(model_name, run_id), *(check_name(p, "key segment") for p in parts)])


def search_rung_key(model_name: str, run_id: str, rung: int, trial: str) -> str:
    """``<model>/runs/<run segment>/search/rung-<r>/<trial>.json``: a trial's published result of rung r."""
    return run_key(model_name, run_id, *search_rung_parts(rung, trial))


def search_rung_parts(rung: int, trial: str) -> tuple[str, str, str]:
    """The run-relative parts of `search_rung_key` (also the worker's local layout)."""
    if not isinstance(rung, int) or isinstance(rung, bool) or rung < 1:
        raise UnsafeNameError(f"invalid search rung {_shown(rung)}: expected an integer >= 1")
    return SEARCH_DIR, f"rung-{rung}", f"{check_candidate(trial)}.json"


def search_survivors_parts(rung: int) -> tuple[str, str]:
    """``search/survivors-<r>.json``: the trials that go on after rung r."""
    if not isinstance(rung, int) or isinstance(rung, bool) or rung < 1:
        raise UnsafeNameError(f"invalid search rung {_shown(rung)}: expected an integer >= 1")
    return SEARCH_DIR, f"survivors-{rung}.json"


def candidate_key(model_name: str, run_id: str, candidate: str, name: str) -> str:
    """``<model>/runs/<run segment>/<candidate>/<name>`` (`name` may be a relative path)."""
    return candidate_prefix(model_name, run_id, candidate) + str(check_relative_path(name, "candidate file"))


def artifact_key(model_name: str, path: str) -> str:
    """The key of an artifact path as the registry page names it: ``runs/<run segment>/<file path>``
    or ``versions/<version>/<file path>`` -- every segment checked, so nothing else can be named."""
    parts = path.split("/")
    if len(parts) < 3 or parts[0] not in ("runs", "versions"):
        raise UnsafeNameError(f"invalid artifact path {_shown(path)}: expected runs/<run>/<file> or "
                              "versions/<version>/<file>")
    if parts[0] == "runs":
        run_id_from_segment(parts[1])
    else:
        check_version(parts[1])
    check_relative_path("/".join(parts[2:]), "artifact path")
    return model_root(model_name) + path


def check_dataset_hash(value: object) -> str:
    """A dataset hash (64 lower-case hex digits) as read from XCom, a pointer or a listing."""
    if not isinstance(value, str) or not _HASH_RE.match(value):
        raise UnsafeNameError(f"invalid dataset hash {_shown(value)}: expected 64 lower-case hex digits")
    return value


def dataset_prefix(model_name: str, dataset_hash: str) -> str:
    """``<model>/datasets/<dataset hash>/``: a dataset snapshot, shared by every run that uses the data."""
    return f"{model_root(model_name)}datasets/{check_dataset_hash(dataset_hash)}/"


def dataset_key(model_name: str, dataset_hash: str, name: str) -> str:
    """One object of a dataset snapshot (a pack, the manifest, the index, COMPLETE)."""
    return dataset_prefix(model_name, dataset_hash) + check_name(name, "snapshot file name")


def versions_root(model_name: str) -> str:
    """``<model>/versions/``."""
    return f"{model_root(model_name)}versions/"


def version_prefix(model_name: str, version: str) -> str:
    """``<model>/versions/<version>/``."""
    return f"{versions_root(model_name)}{check_version(version)}/"


POINTER_FILE = "production.json"


def pointer_key(model_name: str) -> str:
    """``<model>/production.json``."""
    return f"{model_root(model_name)}{POINTER_FILE}"


def promotions_root(model_name: str) -> str:
    """``<model>/promotions/``: the append-only promotion log."""
    return f"{model_root(model_name)}promotions/"


def version_key(model_name: str, version: str, name: str) -> str:
    """``<model>/versions/<version>/<name>``."""
    return version_prefix(model_name, version) + check_name(name, "version file name")


def promotion_log_key(model_name: str, when: datetime, version: str) -> str:
    """``<model>/promotions/<utc time>-<version>.json``: one immutable entry of the promotion log."""
    return f"{promotions_root(model_name)}{when.astimezone(UTC):{LOG_TIME_FORMAT}}-{check_version(version)}.json"


def version_from_log_key(model_name: str, key: str) -> str:
    """The version a promotion-log key is named after (``<time>-<version>.json``)."""
    return key[len(promotions_root(model_name)):].removesuffix(".json").partition("-")[2]


def _shown(value: object, limit: int = 80) -> str:
    """A value for an error message: repr'd and cut, so a hostile 16 kB name stays one line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
