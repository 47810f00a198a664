"""Soak: run the retraining DAG N times back to back on a real Airflow with random faults, then check invariants.

    python scripts/soak.py --runs 10 [--seed 7] [--dir DIR] [--keep] [--verbose]     (make soak N=10)

Everything runs on the embedded defaults, as `make demo` does: a private SeaweedFS (`weed
mini`) on loopback and `airflow standalone` (scheduler, dag-processor, triggerer, api-server;
LocalExecutor, SQLite) on free ports under one temporary folder, a generated 3-class sample,
scratch_tiny at 32 px. Each run is a real DAG run, triggered like a user would and watched
through the metadata DB. A seeded RNG picks each run's faults:

- ``store_restart``    SIGKILL the object store right after a random task succeeded, restart it on
                       the same data dir and ports; the next tasks must reconnect (or retry) and carry on;
- ``train_kill``       SIGKILL the `training.train` task process mid-epoch (the PID Airflow recorded);
                       Airflow's own retry must train it again and the run go on;
- ``cache_corruption`` flip a bit in the decoded-image cache the previous run left; `prepare` must
                       detect it by checksum and rebuild, and training never see it;
- ``rival_promoter``   another process trains, gates against the same champion and promotes the moment
                       the DAG's `release.promote` starts: one conditional write wins, the other re-gates;
- ``tampered_model``   after the run, change production's model.keras in the store; a long-lived
                       `ModelClient` must keep serving the model it had, a fresh load must refuse it;
                       then the bytes are repaired;
- ``double_trigger``   a second run is triggered right behind the first (two people pressing Trigger):
                       `max_active_runs=1` must queue it until the first ends, and both must succeed;
- ``wiped_work_dir``   delete the whole ML_WORK_DIR (datasets, caches, run folders) right after a random
                       task succeeded, as if the next task ran on a fresh worker: it must get everything it
                       needs from the store by hash and the run go on.

After every run: the DAG run succeeded; production.json names a COMPLETE version whose files
match their sha256; every pointer move in the promotion log has its run's gate.json saying
promote, and the last one is what the pointer names; the consumer serves production; no
temporary objects or folders older than the run are left. At the end the RSS of the long-lived
processes (SeaweedFS, scheduler, its LocalExecutor workers, dag-processor, api-server, triggerer,
this process) must not
grow without bound (mean of the last third vs the first third of the runs). Prints
``soak: runs=N faults=K invariant_violations=V`` and exits 1 if V > 0.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

from ml.registry import layout  # noqa: E402
from scripts.airflow_stack import AirflowStack, TaskState, free_port  # noqa: E402

MODEL = "image-classifier"
BUCKET = "soak"
FAULTS = ("store_restart", "train_kill", "cache_corruption", "rival_promoter", "tampered_model", "double_trigger",
          "wiped_work_dir")
FAULT_PROBABILITY = {"store_restart": 0.4, "train_kill": 0.3, "cache_corruption": 0.3, "rival_promoter": 0.3,
                     "tampered_model": 0.4, "double_trigger": 0.2, "wiped_work_dir": 0.3}
# The work dir is wiped right after one of these (a task that runs alone): the next task starts from nothing.
WIPE_AFTER = ("data.ingest", "data.validate", "training.prepare", "release.evaluate", "release.gate")
# The store is restarted right after one of these succeeded: the next task meets a fresh store.
RESTART_AFTER = ("data.ingest", "data.validate", "data.should_train", "training.prepare", "training.train[0]",
                 "release.evaluate", "release.gate")
EPOCHS = (3, 8, 15)  # drawn per run: models of varying quality, so the gate decides both ways
# scratch_tiny on 63 training images stays near chance (0.24-0.35 test accuracy at 32-48 px, lr 0.001-0.01,
# 15 epochs); the soak tests the machinery, not the model. Log loss still tells the runs apart.
IMAGE_SIZE = 32
KILL_EPOCHS = 25  # a run whose training gets killed trains longer, so the kill lands mid-training
TRAIN_TASK = "training.train[0]"
RUN_TIMEOUT_S = 1200
# RSS may grow this much (and this fraction) from the first third of the runs to the last third.
RSS_GROWTH_MB = 150.0
RSS_GROWTH_FRACTION = 0.5
LONG_LIVED = ("weed", "scheduler", "executor-workers", "dag-processor", "api-server", "triggerer", "soak")

# Tasks read this file (ML_CONFIG); DAG params (the run conf) override it per run.
PIPELINE_YAML = {
    "storage": {"model_name": MODEL},
    "data": {"min_images_per_class": 5},
    # A high learning rate: scratch_tiny learns the sample within a few epochs of 3 steps.
    "train": {"learning_rate": 0.01, "early_stopping_patience": 1000},
    # force (in the conf): retrain on the same sample every run; the gate still decides on the numbers.
    # log_loss: a continuous metric, so challengers win or lose (accuracy on 17 test images mostly ties).
    "gate": {"metric": "log_loss", "min_gain_over_chance": 0.0, "min_delta": 0.0},
}

log = logging.getLogger("soak")

RIVAL = """
import json, pathlib, sys, time
from ml import pipeline as P
from ml.config import PipelineConfig
from ml.registry.store import ObjectStore
args = json.loads(pathlib.Path(sys.argv[1]).read_text())
config = PipelineConfig.from_dict(args["config"])
store = ObjectStore.from_config(config.storage)
run_id = args["run_id"]
dataset = P.ingest_stage(config, store)
P.prepare_stage(dataset, config)
results = [P.train_stage(dataset, c, config, store, run_id) for c in config.train.candidates]
evaluation = P.evaluate_stage(dataset, results, config, store, run_id)
decision = P.gate_stage(dataset, evaluation, config, store, run_id)
pathlib.Path(sys.argv[1] + ".ready").write_text(json.dumps({"promote": decision["promote"]}))
while not pathlib.Path(sys.argv[2]).exists():
    time.sleep(0.01)
result = P.promote_stage(dataset, evaluation, decision, config, store, run_id, actor="soak-rival")
print(json.dumps({"promoted": result["promoted"], "version": result.get("version")}))
"""


def rss_mb(pid: int | None) -> float:
    """Resident set size of a process from /proc (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        pass
    return 0.0


def history_rows(folder: Path) -> int:
    """Completed epochs in any history.csv below `folder` (CSVLogger flushes a row per epoch)."""
    rows = 0
    for path in folder.rglob("history.csv"):
        with contextlib.suppress(OSError):
            rows = max(rows, len(path.read_text().splitlines()) - 1)
    return rows


class Rival:
    """A second promoter in its own process: trains, gates, then waits for `go()` to promote."""

    def __init__(self, root: Path, config: Any, run_id: str, env: dict[str, str]) -> None:
        self.run_id = run_id
        self.folder = Path(tempfile.mkdtemp(prefix="rival-", dir=root))
        self.args, self.go_file = self.folder / "args.json", self.folder / "go"
        self.args.write_text(json.dumps({"config": config.to_dict(), "run_id": run_id}))
        self.proc = subprocess.Popen([sys.executable, "-c", RIVAL, str(self.args), str(self.go_file)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.released = False

    def wait_ready(self, timeout: float) -> bool:
        """Until the rival has gated (True) or died / timed out (False)."""
        deadline = time.monotonic() + timeout
        while not Path(str(self.args) + ".ready").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def go(self) -> None:
        self.go_file.touch()
        self.released = True

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        if not self.released:
            self.go()  # the DAG run ended before its promote started: promote anyway, sequentially
        out, err = self.proc.communicate(timeout=timeout)
        shutil.rmtree(self.folder, ignore_errors=True)
        return self.proc.returncode, out, err


class Soak:
    def __init__(self, root: Path, seed: int) -> None:
        import yaml

        from ml.data.sample import make_sample_dataset
        from ml.registry.seaweed import SeaweedServer
        from ml.registry.store import ObjectStore
        from ml.serving.predictor import ModelClient

        self.root = root
        self.rng = random.Random(seed)
        self.server = SeaweedServer(root / "weed").start(timeout=90)
        self.store = ObjectStore(BUCKET, endpoint_url=self.server.endpoint_url, access_key=self.server.access_key,
                                 secret_key=self.server.secret_key)
        self.store.ensure_bucket()
        self.sample = root / "sample"
        make_sample_dataset(self.sample, classes=3, per_class=30, size=40, seed=seed)
        config_file = root / "pipeline.yaml"
        config_file.write_text(yaml.safe_dump(PIPELINE_YAML))
        self.stack = AirflowStack(root, self.server, api_port=free_port(), bucket=BUCKET,
                                  extra_env={"ML_CONFIG": str(config_file)})
        self.client = ModelClient(self.store, MODEL, cache_dir=root / "consumer")
        self.violations: list[str] = []
        self.faults: list[str] = []
        self.rss: list[dict[str, float]] = []
        self.outcomes: Counter[str] = Counter()

    def start(self) -> None:
        started = time.monotonic()
        self.stack.prepare()
        self.stack.start()
        self.stack.wait_for_dag()
        log.info("airflow standalone up at %s in %.0f s (home %s); store %s", self.stack.url,
                 time.monotonic() - started, self.stack.home, self.server.endpoint_url)

    def violation(self, message: str) -> None:
        log.error("INVARIANT VIOLATED: %s", message)
        self.violations.append(message)

    # -- faults ----------------------------------------------------------------------------
    def restart_store(self) -> None:
        os.killpg(self.server.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.server.is_running() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.server.restart()

    def corrupt_cache(self) -> Path | None:
        """Flip one bit in the middle of the decoded-image cache a previous run built."""
        from ml.data.image_cache import IMAGES_FILE

        caches = sorted((self.stack.work_dir / "cache").rglob(IMAGES_FILE))
        if not caches:
            return None
        images = caches[0]
        with images.open("r+b") as fh:
            fh.seek(images.stat().st_size // 2)
            byte = fh.read(1)[0]
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte ^ 0x01]))
        return images

    def kill_training(self, task: TaskState, cand_dir: Path) -> bool:
        """SIGKILL the training task process once it has finished 2 epochs (False: not yet)."""
        if task.state != "running" or not task.pid or task.try_number != 1 or history_rows(cand_dir) < 2:
            return False
        if not self.stack.owns(task.pid):
            self.violation(f"task pid {task.pid} is not a process of the soak's Airflow; not killed")
            return True
        os.kill(task.pid, signal.SIGKILL)
        return True

    def start_rival(self, run_id: str, epochs: int) -> Rival:
        from ml.config import PipelineConfig

        # Another worker: its own work dir, the same store and champion.
        config = PipelineConfig.from_dict({
            **PIPELINE_YAML, "work_dir": str(self.root / "rival-work"),
            "storage": {"bucket": BUCKET, "model_name": MODEL, "endpoint_url": self.server.endpoint_url},
            "data": {**PIPELINE_YAML["data"], "source": str(self.sample)},
            "train": {**PIPELINE_YAML["train"], "candidates": ["scratch_tiny"], "epochs": epochs,
                      "image_size": IMAGE_SIZE, "finetune_top_k": 0},
            "gate": {**PIPELINE_YAML["gate"], "force": True},
        })
        env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_ACCESS_KEY_ID": self.server.access_key,
               "AWS_SECRET_ACCESS_KEY": self.server.secret_key, "ML_S3_ENDPOINT_URL": self.server.endpoint_url or ""}
        return Rival(self.root, config, run_id + "-rival", env)

    def tamper_and_repair(self, version: str, previous: str | None) -> None:
        """Replace production's model.keras; the client must keep its model, a fresh load refuse; then repair."""
        from ml.errors import ModelVerificationError
        from ml.registry.versions import version_prefix
        from ml.serving.predictor import load_production

        key = version_prefix(MODEL, version) + "model.keras"
        original = self.store.get_bytes(key)
        self.store.put_bytes(key, original + b"tampered")
        serving = self.client.refresh() if self.client.current is not None else None
        if serving is not None and serving.version != previous:
            self.violation(f"ModelClient switched to {serving.version} while its model.keras was tampered")
        try:
            load_production(self.store, MODEL, cache_dir=self.root / f"fresh-{uuid.uuid4().hex[:6]}")
            self.violation(f"a tampered model.keras of {version} was loaded")
        except ModelVerificationError:
            pass
        self.store.put_bytes(key, original)  # the repair an operator would do: re-upload the verified bytes
        log.info("  fault: tampered %s (refused; client kept %s), then repaired", key, previous)

    # -- one run ---------------------------------------------------------------------------
    def run(self, index: int) -> None:
        from ml.registry.layout import run_segment
        from ml.registry.versions import read_pointer

        faults = [f for f in FAULTS if self.rng.random() < FAULT_PROBABILITY[f]]
        epochs = KILL_EPOCHS if "train_kill" in faults else self.rng.choice(EPOCHS)
        restart_after = self.rng.choice(RESTART_AFTER)
        wipe_after = self.rng.choice(WIPE_AFTER)
        run_id = f"soak__{index:03d}_{uuid.uuid4().hex[:4]}"
        cand_dir = self.stack.work_dir / "runs" / run_segment(run_id) / "scratch_tiny"
        started = datetime.now(UTC)
        clock = time.monotonic()
        injected: list[str] = []
        log.info("run %d %s: epochs %d, faults drawn %s%s", index, run_id, epochs, faults or "none",
                 f" (store restart after {restart_after})" if "store_restart" in faults else "")

        if "cache_corruption" in faults:
            corrupted = self.corrupt_cache()
            if corrupted is not None:
                injected.append("cache_corruption")
                log.info("  fault: flipped a bit in %s", corrupted)
        rival = self.start_rival(run_id, self.rng.choice(EPOCHS)) if "rival_promoter" in faults else None
        if rival is not None and not rival.wait_ready(timeout=300):
            self.violation(f"rival {rival.run_id} never got to its gate: {rival.finish()[2].strip()[-500:]}")
            rival = None
        previous = self.client.current.version if self.client.current else None
        conf = {"source": str(self.sample), "candidates": ["scratch_tiny"], "epochs": epochs, "image_size": IMAGE_SIZE,
                "finetune_top_k": 0, "force": True}
        self.stack.trigger(conf, run_id)
        twin = self.stack.trigger({**conf, "epochs": self.rng.choice(EPOCHS)}, run_id + "_twin") \
            if "double_trigger" in faults else None

        pending = {f for f in faults if f in ("store_restart", "train_kill", "rival_promoter", "wiped_work_dir")}
        if rival is None:
            pending.discard("rival_promoter")
        state = "timed out"
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            tasks = {t.label: t for t in self.stack.tasks(run_id)}
            if "store_restart" in pending and getattr(tasks.get(restart_after), "state", None) == "success":
                self.restart_store()
                pending.discard("store_restart")
                injected.append("store_restart")
                log.info("  fault: store SIGKILLed and restarted after %s", restart_after)
            if "wiped_work_dir" in pending and getattr(tasks.get(wipe_after), "state", None) == "success":
                shutil.rmtree(self.stack.work_dir, ignore_errors=True)
                pending.discard("wiped_work_dir")
                injected.append("wiped_work_dir")
                log.info("  fault: wiped the work dir %s after %s", self.stack.work_dir, wipe_after)
            if "train_kill" in pending and TRAIN_TASK in tasks:
                task = tasks[TRAIN_TASK]
                if task.try_number > 1 or task.state in ("success", "failed"):
                    pending.discard("train_kill")  # too late to land mid-training
                elif self.kill_training(task, cand_dir):
                    pending.discard("train_kill")
                    injected.append("train_kill")
                    log.info("  fault: SIGKILLed %s (pid %d) after %d epochs", TRAIN_TASK, task.pid,
                             history_rows(cand_dir))
            # Released as the DAG's gate has decided: both promoters then publish and swap together.
            promote_state = getattr(tasks.get("release.promote"), "state", None)
            if "rival_promoter" in pending and (getattr(tasks.get("release.gate"), "state", None) == "success"
                                                or promote_state in ("scheduled", "queued", "running", "success")):
                rival.go()
                pending.discard("rival_promoter")
                injected.append("rival_promoter")
                log.info("  fault: rival %s released with release.promote (%s)", rival.run_id, promote_state)
            state = self.stack.run_state(run_id)
            if state in ("success", "failed"):
                break
            time.sleep(0.1 if pending else 0.5)

        if rival is not None:
            code, out, err = rival.finish()
            if code != 0:
                self.violation(f"rival promoter of {rival.run_id} failed: {err.strip().splitlines()[-3:]}")
            else:
                log.info("  rival %s: %s", rival.run_id, out.strip().splitlines()[-1])
        if twin is not None:
            self.check_twin(run_id, twin)
            injected.append("double_trigger")
        # A work dir wiped before `prepare` took the corrupted cache with it: nothing left to detect.
        if "cache_corruption" in injected and not ("wiped_work_dir" in injected and wipe_after.startswith("data.")):
            self.check_cache_rebuilt(run_id)
        if state != "success":
            failed = [f"{t.label} ({t.state}, try {t.try_number})" for t in self.stack.tasks(run_id)
                      if t.state not in ("success", "skipped")]
            self.violation(f"DAG run {run_id} ended {state}; tasks: {failed}; logs in {self.stack.home / 'logs'}")
        retried = [f"{t.label} x{t.try_number}" for t in self.stack.tasks(run_id) if t.try_number > 1]
        entry = self.decision_of(run_id)
        self.outcomes[entry.get("action", "none") if entry else "none"] += 1
        production, _ = read_pointer(self.store, MODEL)
        if "tampered_model" in faults and production:
            # If production moved, the consumer has not loaded the new model yet: it must not switch to
            # the tampered bytes. If not, it keeps its verified cached copy. A fresh load must refuse.
            self.tamper_and_repair(production["version"], previous)
            injected.append("tampered_model")
        self.check_invariants(started)
        self.faults += injected
        import keras

        keras.backend.clear_session()
        gc.collect()
        self.rss.append(self.sample_rss())
        log.info("run %d %s: %s in %.0f s, faults %s, retried %s, gate %s (%s) -> production %s; RSS MB %s", index,
                 run_id, state, time.monotonic() - clock, injected or "none", retried or "none",
                 entry.get("action") if entry else "none", (entry or {}).get("reasons", ["-"])[0],
                 self.client.current.version if self.client.current else None,
                 {k: round(v) for k, v in self.rss[-1].items()})

    def decision_of(self, run_id: str) -> dict[str, Any] | None:
        from ml.registry.versions import promotion_history

        return next((e for e in reversed(promotion_history(self.store, MODEL)) if e.get("run_id") == run_id), None)

    def sample_rss(self) -> dict[str, float]:
        pids = {"weed": [self.server.pid], **self.stack.components(), "soak": [os.getpid()]}
        return {name: sum(rss_mb(pid) for pid in pids.get(name, [])) for name in LONG_LIVED}

    # -- invariants ------------------------------------------------------------------------
    def check_invariants(self, run_started: datetime) -> None:
        from ml.registry.versions import (
            IncompleteVersionError,
            promotion_history,
            read_pointer,
            read_version,
            version_prefix,
        )

        pointer, _ = read_pointer(self.store, MODEL)
        if pointer is not None:
            try:
                info = read_version(self.store, MODEL, pointer["version"])
                for name, meta in info["files"].items():
                    data = self.store.get_bytes(version_prefix(MODEL, pointer["version"]) + name)
                    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                        self.violation(f"{pointer['version']}/{name} does not match its sha256")
                if pointer["sha256"] != info["sha256"]:
                    self.violation(f"pointer sha256 differs from version {pointer['version']}'s model")
            except IncompleteVersionError as exc:
                self.violation(f"pointer names an incomplete version: {exc}")
        history = promotion_history(self.store, MODEL)
        moves = [e for e in history if e.get("action") in ("promote", "rollback")]
        for entry in moves:
            key = layout.run_key(MODEL, str(entry.get("run_id")), layout.GATE_FILE)
            found = self.store.get_with_etag(key)
            if found is None or not json.loads(found[0]).get("promote"):
                self.violation(f"promotion {entry['key']} has no gate decision to promote at {key}")
        if moves and pointer is not None and moves[-1]["to"] != pointer["version"]:
            self.violation(f"last logged move is to {moves[-1]['to']} but production is {pointer['version']}")
        if pointer is None and moves:
            self.violation("promotions are logged but there is no production pointer")
        if pointer is not None:
            serving = self.client.refresh()
            if serving.version != pointer["version"] or serving.sha256 != pointer["sha256"]:
                self.violation(f"the consumer serves {serving.version}, production is {pointer['version']}")
        self.check_orphans(run_started)

    def check_twin(self, run_id: str, twin: str) -> None:
        """The run triggered right behind `run_id` waited for it (max_active_runs=1) and succeeded."""
        state = self.stack.wait_run(twin, timeout=RUN_TIMEOUT_S)
        _, first_end = self.stack.run_times(run_id)
        twin_start, _ = self.stack.run_times(twin)
        log.info("  fault: twin run %s %s (started %s, first run ended %s)", twin, state, twin_start, first_end)
        if state != "success":
            self.violation(f"twin run {twin} ended {state}")
        if not (first_end and twin_start and twin_start >= first_end):
            self.violation(f"twin run {twin} started at {twin_start}, before {run_id} ended at {first_end}")

    def check_cache_rebuilt(self, run_id: str) -> None:
        """The corrupted cache was detected by `prepare` (before any training) and is whole again."""
        from ml.data.image_cache import IMAGES_FILE, ImageCache
        from ml.errors import CacheCorruptError

        prepare_log = self.stack.task_log(run_id, "training.prepare")
        if "is damaged and will be rebuilt" not in prepare_log:
            self.violation(f"{run_id}: training.prepare did not report the corrupted image cache")
        for images in (self.stack.work_dir / "cache").rglob(IMAGES_FILE):
            try:
                ImageCache.load(images.parent, verify=True)
            except CacheCorruptError as exc:
                self.violation(f"{run_id}: the image cache is still corrupt after the run: {exc}")

    def check_orphans(self, run_started: datetime) -> None:
        keys = self.store.list_keys(layout.model_root(MODEL))
        key_set = set(keys)
        root = layout.versions_root(MODEL)
        versions = {k[len(root):].split("/", 1)[0] for k in keys if k.startswith(root)}
        for version in versions:
            prefix = layout.version_prefix(MODEL, version)
            if layout.version_key(MODEL, version, layout.COMPLETE_MARKER) not in key_set:
                first = self.store.head(next(k for k in keys if k.startswith(prefix)))
                if first and first["last_modified"] < run_started:
                    self.violation(f"incomplete version {version} left from an earlier run")
        for key in keys:
            parts = key.split("/")
            if len(parts) == 5 and parts[1] == "runs" and parts[4] == layout.MODEL_FILE:
                marker = "/".join(parts[:4]) + "/" + layout.CANDIDATE_MARKER
                if marker not in key_set:
                    self.violation(f"candidate {'/'.join(parts[:4])} has files but no marker")
        cutoff = run_started.timestamp()
        for work in (self.stack.work_dir, self.root / "rival-work"):
            for path in work.rglob("*") if work.exists() else ():
                name = path.name
                temporary = name.startswith(".staging-") or ".tmp-" in name or name.endswith(".part")
                if temporary and path.stat().st_mtime < cutoff:
                    self.violation(f"temporary {path} left from an earlier run")

    def check_memory(self) -> None:
        if len(self.rss) < 3:
            return
        third = max(1, len(self.rss) // 3)
        for name in LONG_LIVED:
            first = sum(r[name] for r in self.rss[:third]) / third
            last = sum(r[name] for r in self.rss[-third:]) / third
            log.info("RSS of %s: %.0f MB (first third of the runs) -> %.0f MB (last third)", name, first, last)
            if last - first > RSS_GROWTH_MB and last > first * (1 + RSS_GROWTH_FRACTION):
                self.violation(f"RSS of {name} grew from {first:.0f} MB to {last:.0f} MB")

    def close(self) -> None:
        try:
            self.stack.stop()
        finally:
            self.server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="DAG runs (default 10)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the fault RNG")
    parser.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (Airflow logs, store data)")
    parser.add_argument("--verbose", action="store_true", help="library logs and Keras progress too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    if not args.verbose:
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
    root = args.dir or Path(tempfile.mkdtemp(prefix="ml-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    runs_done = 0
    soak = Soak(root, args.seed)
    try:
        soak.start()
        for index in range(args.runs):
            quiet = contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(io.StringIO())
            try:
                with quiet:
                    soak.run(index)
                runs_done += 1
            except Exception as exc:  # noqa: BLE001 - a crashed run is a finding, not the end of the soak
                soak.violation(f"run {index} failed: {type(exc).__name__}: {exc}")
        soak.check_memory()
    finally:
        soak.close()
        if not args.keep and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
        elif args.keep:
            log.info("kept %s (Airflow home, logs, store data)", root)
    log.info("%d runs in %.0f s; gate outcomes %s; faults %s", runs_done, time.monotonic() - started,
             dict(soak.outcomes), dict(Counter(soak.faults)))
    print(f"soak: runs={runs_done} faults={len(soak.faults)} invariant_violations={len(soak.violations)}")
    return 1 if soak.violations else 0


if __name__ == "__main__":
    sys.exit(main())
