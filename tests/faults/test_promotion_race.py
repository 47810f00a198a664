"""Fault 4: promotions racing in separate processes with the same expected ETag.

Two real processes call `promote_stage` at the same moment (released together by a go-file
after their imports), both gated against the same champion. Exactly one pointer move may win
that ETag; the loser re-gates against the new champion and either promotes properly or stops
with the reason, and the promotion log shows both decisions. A second test releases several
processes through a barrier straight into `swap_pointer`.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import time

import pytest

from tests.faults.conftest import (
    MODEL,
    PYTHON,
    assert_pointer_verifiable,
    new_bucket_name,
    run_to_gate,
    seed_production,
    store_for,
    subprocess_env,
    tiny_config,
)

pytestmark = pytest.mark.faults

PROMOTE = """
import json, pathlib, sys, time
from ml.config import PipelineConfig
from ml.pipeline import promote_stage
from ml.registry.store import ObjectStore
import keras, tensorflow  # warm: both racers start promoting at the same moment
args = json.loads(pathlib.Path(sys.argv[1]).read_text())
config = PipelineConfig.from_dict(args["config"])
store = ObjectStore.from_config(config.storage)
pathlib.Path(sys.argv[1] + ".ready").touch()
while not pathlib.Path(sys.argv[2]).exists():
    time.sleep(0.01)
result = promote_stage(args["dataset"], args["evaluation"], args["decision"], config, store, args["run_id"],
                       actor=args["run_id"])
print(json.dumps(result))
"""


def test_two_processes_promote_at_once_exactly_one_wins_and_loser_regates(own_seaweed, sample_source, tmp_path):
    from ml.registry.versions import promotion_history, read_pointer

    bucket = new_bucket_name()
    store = store_for(own_seaweed, bucket)
    config = tiny_config(tmp_path / "work", bucket, own_seaweed.endpoint_url, source=sample_source)
    from ml import pipeline as P

    dataset = P.ingest_stage(config, store)
    P.train_stage(dataset, "scratch_tiny", config, store, "seed-run")
    seed_production(config, store, "seed-run", "scratch_tiny", "v0-champion")
    runs = {run_id: run_to_gate(config, store, run_id) for run_id in ("run-a", "run-b")}
    etags = {run["decision"]["expected_etag"] for run in runs.values()}
    assert len(etags) == 1 and all(run["decision"]["promote"] for run in runs.values())
    # run-a's gate forces promotion; run-b's re-gate is strict, so if run-b loses it must stop.
    strict = tiny_config(tmp_path / "work", bucket, own_seaweed.endpoint_url,
                         gate={"force_promote": False, "min_delta": 0.9})
    configs = {"run-a": config, "run-b": strict}
    go = tmp_path / "go"
    env = subprocess_env(AWS_ACCESS_KEY_ID=own_seaweed.access_key, AWS_SECRET_ACCESS_KEY=own_seaweed.secret_key)
    procs = {}
    for run_id, run in runs.items():
        args = tmp_path / f"{run_id}.json"
        args.write_text(json.dumps({"config": configs[run_id].to_dict(), "dataset": run["dataset"],
                                    "evaluation": run["evaluation"], "decision": run["decision"],
                                    "run_id": run_id}))
        procs[run_id] = subprocess.Popen([PYTHON, "-c", PROMOTE, str(args), str(go)], env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"{r}.json.ready").exists() for r in runs) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outputs = {r: p.communicate(timeout=300) for r, p in procs.items()}

    for run_id, (_out, err) in outputs.items():
        assert procs[run_id].returncode == 0, f"{run_id}: {err[-3000:]}"
    results = {r: json.loads(out.strip().splitlines()[-1]) for r, (out, _) in outputs.items()}
    log = [e for e in promotion_history(store, MODEL) if e.get("run_id") in runs]
    lost = [e for e in log if e["action"] == "keep" and "lost the pointer race" in " ".join(e["reasons"])]
    assert len(lost) == 1, f"expected exactly one loser, log: {log}"
    loser = lost[0]["run_id"]
    winner = "run-b" if loser == "run-a" else "run-a"
    first_moves = [e for e in log if e["action"] == "promote" and e["from"] == "v0-champion"]
    assert [e["run_id"] for e in first_moves] == [winner], "exactly one move from the shared champion"
    winner_version = results[winner]["version"]
    assert lost[0]["from"] == "v0-champion" and f"lost the pointer race to {winner_version}" in lost[0]["reasons"][0]
    pointer, _ = read_pointer(store, MODEL)
    if loser == "run-a":  # forced gate: re-gated against run-b's version and promoted over it
        assert results["run-a"]["promoted"] is True
        moves = [e for e in log if e["action"] == "promote" and e["run_id"] == "run-a"]
        assert len(moves) == 1 and moves[0]["from"] == winner_version
        assert pointer["version"] == results["run-a"]["version"]
    else:  # strict re-gate: stops with the reason, production stays the winner's
        assert results["run-b"]["promoted"] is False
        assert "re-gated against the new champion" in results["run-b"]["reason"]
        assert pointer["version"] == winner_version
    assert_pointer_verifiable(store)


def _race_swap(endpoint: str, access: str, secret: str, bucket: str, version: str, etag: str, barrier, queue):
    from ml.errors import PromotionConflict
    from ml.registry.store import ObjectStore
    from ml.registry.versions import make_pointer, swap_pointer

    store = ObjectStore(bucket, endpoint_url=endpoint, access_key=access, secret_key=secret)
    pointer = make_pointer(store, MODEL, version)
    store.list_buckets()  # connection warm before the barrier
    barrier.wait(30)
    try:
        swap_pointer(store, MODEL, pointer, etag)
        queue.put((version, "won", ""))
    except PromotionConflict as exc:
        queue.put((version, "conflict", str(exc)))


def test_processes_released_by_a_barrier_swap_the_pointer_exactly_once(own_seaweed, tmp_path):
    from ml.registry.versions import promote, publish_version, read_pointer

    bucket = new_bucket_name()
    store = store_for(own_seaweed, bucket)
    racers = 4
    for i in range(racers + 1):
        folder = tmp_path / f"v{i}"
        folder.mkdir()
        files = {}
        for name, data in (("model.keras", f"model {i}"), ("labels.json", "[]"), ("preprocessing.json", "{}")):
            (folder / name).write_text(data)
            files[name] = folder / name
        publish_version(store, MODEL, f"v{i}", files, {})
    promote(store, MODEL, "v0", expected_etag=None, actor="test", reason="seed")
    _, etag = read_pointer(store, MODEL)
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(racers), ctx.Queue()
    procs = [ctx.Process(target=_race_swap, args=(own_seaweed.endpoint_url, own_seaweed.access_key,
                                                   own_seaweed.secret_key, bucket, f"v{i}", etag, barrier, queue))
             for i in range(1, racers + 1)]
    for p in procs:
        p.start()
    outcomes = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)

    winners = [v for v, outcome, _ in outcomes if outcome == "won"]
    assert len(winners) == 1, outcomes
    assert all("another promotion won" in msg for _, outcome, msg in outcomes if outcome == "conflict")
    pointer, _ = read_pointer(store, MODEL)
    assert pointer["version"] == winners[0]
