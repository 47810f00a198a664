"""Soak: run the pipeline N times back to back with random faults, then check the invariants.

    python scripts/soak.py --runs 10 [--seed 7] [--dir DIR] [--keep]

Everything runs on the embedded defaults: a private SeaweedFS (`weed mini`) on loopback, a
generated 3-class sample, the stage functions of `ml.pipeline` in this process (what `python -m
ml run` calls), scratch_tiny at 32 px for 2-4 epochs. Before or during each run a seeded RNG
picks faults from:

- ``store_restart``   SIGKILL the object store between two stages, restart it on the same data
                      dir and ports; the same client carries on;
- ``cache_corruption`` flip a bit in the decoded-image cache (images.u8) before training;
- ``rival_promoter``  a second run, gated against the same champion, promotes from another
                      process at the same moment (one conditional write wins, the other re-gates);
- ``tampered_model``  right after a promotion, replace the new model.keras in the store; a
                      long-lived `ModelClient` must keep serving its previous model; then repair it.

After every run: production.json names a COMPLETE version whose files match their sha256; every
"promote" in the promotion log has its run's gate.json saying promote, and the last one is what
the pointer names; no temporary objects or folders older than the run are left. At the end the
RSS of the long-lived processes (SeaweedFS, this process) must not grow without bound (mean of
the last third vs the first third of the runs). Prints ``soak: runs=N faults=K
invariant_violations=V`` and exits 1 if V > 0.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

from ml.config import PipelineConfig  # noqa: E402

MODEL = "image-classifier"
BUCKET = "soak"
FAULTS = ("store_restart", "cache_corruption", "rival_promoter", "tampered_model")
FAULT_PROBABILITY = {"store_restart": 0.5, "cache_corruption": 0.3, "rival_promoter": 0.3, "tampered_model": 0.4}
# RSS may grow this much (and this fraction) from the first third of the runs to the last third.
RSS_GROWTH_MB = 150.0
EPOCHS = (2, 3, 4)  # drawn per run: models of varying quality, so the gate decides both ways
RSS_GROWTH_FRACTION = 0.5

log = logging.getLogger("soak")

RIVAL = """
import json, pathlib, sys, time
from ml.config import PipelineConfig
from ml.pipeline import promote_stage
from ml.registry.store import ObjectStore
import keras, tensorflow  # warm, so that both promoters start at the same moment
args = json.loads(pathlib.Path(sys.argv[1]).read_text())
config = PipelineConfig.from_dict(args["config"])
store = ObjectStore.from_config(config.storage)
pathlib.Path(sys.argv[1] + ".ready").touch()
while not pathlib.Path(sys.argv[2]).exists():
    time.sleep(0.01)
result = promote_stage(args["dataset"], args["evaluation"], args["decision"], config, store, args["run_id"],
                       actor="soak-rival")
print(json.dumps({"promoted": result["promoted"], "version": result.get("version")}))
"""


def rss_mb(pid: int) -> float:
    """Resident set size of a process from /proc (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Soak:
    def __init__(self, root: Path, seed: int) -> None:
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
        self.client = ModelClient(self.store, MODEL, cache_dir=root / "consumer")
        self.violations: list[str] = []
        self.faults: list[str] = []
        self.rss: list[tuple[float, float]] = []
        self.gate_decisions: dict[str, bool] = {}

    # -- configuration ---------------------------------------------------------------------
    def config(self, epochs: int) -> PipelineConfig:
        return PipelineConfig.from_dict({
            "work_dir": str(self.root / "work"),
            "storage": {"bucket": BUCKET, "model_name": MODEL, "endpoint_url": self.server.endpoint_url},
            "data": {"source": str(self.sample), "min_images_per_class": 5},
            # A high learning rate: scratch_tiny learns the sample within a few epochs of 3 steps.
            "train": {"candidates": ["scratch_tiny"], "epochs": epochs, "image_size": 32, "learning_rate": 0.01,
                      "finetune_top_k": 0},
            # force: retrain on the same sample every run; the gate still decides on the numbers.
            "gate": {"force": True, "min_gain_over_chance": 0.0, "min_delta": 0.0},
        })

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
        log.info("fault: store SIGKILLed and restarted on %s", self.server.endpoint_url)

    def corrupt_cache(self, config: PipelineConfig, dataset: dict[str, Any]) -> bool:
        from ml.data.image_cache import IMAGES_FILE, cache_folder
        from ml.pipeline import cache_root

        images = cache_folder(cache_root(config), dataset["dataset_hash"], config.train.image_size) / IMAGES_FILE
        if not images.exists():
            return False
        with images.open("r+b") as fh:
            fh.seek(images.stat().st_size // 2)
            byte = fh.read(1)[0]
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte ^ 0x01]))
        log.info("fault: flipped a bit in %s", images)
        return True

    # -- one run ---------------------------------------------------------------------------
    def run(self, index: int) -> None:
        from ml import pipeline as P

        faults = [f for f in FAULTS if self.rng.random() < FAULT_PROBABILITY[f]]
        epochs = self.rng.choice(EPOCHS)
        restart_at = self.rng.randrange(4)  # before prepare / train / evaluate / promote
        config = self.config(epochs)
        run_id = f"soak-{index:03d}-{uuid.uuid4().hex[:4]}"
        started = datetime.now(UTC)
        injected: list[str] = []

        def maybe_restart(point: int) -> None:
            if "store_restart" in faults and point == restart_at:
                self.restart_store()
                injected.append("store_restart")

        dataset = P.ingest_stage(config, self.store)
        if "cache_corruption" in faults and self.corrupt_cache(config, dataset):
            injected.append("cache_corruption")
        maybe_restart(0)
        P.prepare_stage(dataset["dataset_dir"], config)
        maybe_restart(1)
        results = [P.train_stage(dataset["dataset_dir"], c, config, self.store, run_id)
                   for c in config.train.candidates]
        maybe_restart(2)
        evaluation = P.evaluate_stage(dataset["dataset_dir"], results, config, self.store, run_id)
        decision = P.gate_stage(dataset["dataset_dir"], evaluation, config, self.store, run_id)
        self.gate_decisions[run_id] = bool(decision["promote"])
        log.info("gate of %s: %s (%s)", run_id, "promote" if decision["promote"] else "keep", decision["reasons"][0])
        rival = None
        if "rival_promoter" in faults:
            rival = self.prepare_rival(dataset, run_id, epochs)
        maybe_restart(3)
        previous = self.client.current.version if self.client.current else None
        if rival is not None:
            result = self.race(rival, dataset, evaluation, decision, config, run_id)
            injected.append("rival_promoter")
        else:
            result = P.promote_stage(dataset, evaluation, decision, config, self.store, run_id, actor="soak")
        if "tampered_model" in faults and result.get("promoted"):
            self.tamper_and_repair(result["version"], previous)
            injected.append("tampered_model")
        self.check_invariants(started)
        self.faults += injected
        import keras

        keras.backend.clear_session()
        gc.collect()
        self.rss.append((rss_mb(self.server.pid or 0), rss_mb(os.getpid())))
        log.info("run %d %s: epochs %d, faults %s, promoted %s -> production %s; RSS weed %.0f MB, self %.0f MB",
                 index, run_id, epochs, injected or "none", result.get("promoted"), result.get("version"),
                 *self.rss[-1])

    def prepare_rival(self, dataset: dict[str, Any], run_id: str, epochs: int) -> dict[str, Any]:
        """A second run gated against the same champion, to promote from another process."""
        from ml import pipeline as P

        rival_id = run_id + "-rival"
        config = self.config(self.rng.choice(EPOCHS))
        results = [P.train_stage(dataset["dataset_dir"], c, config, self.store, rival_id)
                   for c in config.train.candidates]
        evaluation = P.evaluate_stage(dataset["dataset_dir"], results, config, self.store, rival_id)
        decision = P.gate_stage(dataset["dataset_dir"], evaluation, config, self.store, rival_id)
        self.gate_decisions[rival_id] = bool(decision["promote"])
        return {"run_id": rival_id, "config": config, "evaluation": evaluation, "decision": decision}

    def race(self, rival: dict[str, Any], dataset: dict[str, Any], evaluation: dict[str, Any],
             decision: dict[str, Any], config: PipelineConfig, run_id: str) -> dict[str, Any]:
        from ml import pipeline as P

        folder = Path(tempfile.mkdtemp(prefix="rival-", dir=self.root))
        args, go = folder / "args.json", folder / "go"
        args.write_text(json.dumps({"config": rival["config"].to_dict(), "dataset": dataset,
                                    "evaluation": rival["evaluation"], "decision": rival["decision"],
                                    "run_id": rival["run_id"]}))
        env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_ACCESS_KEY_ID": self.server.access_key,
               "AWS_SECRET_ACCESS_KEY": self.server.secret_key,
               "ML_S3_ENDPOINT_URL": self.server.endpoint_url or ""}
        proc = subprocess.Popen([sys.executable, "-c", RIVAL, str(args), str(go)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not Path(str(args) + ".ready").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        go.touch()
        try:
            result = P.promote_stage(dataset, evaluation, decision, config, self.store, run_id, actor="soak")
        finally:
            out, err = proc.communicate(timeout=300)
            shutil.rmtree(folder, ignore_errors=True)
        if proc.returncode != 0:
            self.violation(f"rival promoter of {rival['run_id']} failed: {err.strip().splitlines()[-1:]}")
        else:
            log.info("rival %s: %s", rival["run_id"], out.strip().splitlines()[-1])
        return result

    def tamper_and_repair(self, version: str, previous: str | None) -> None:
        """Replace a just-promoted model.keras; the client must keep its model; then put the bytes back."""
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
        log.info("fault: tampered %s (refused; client kept %s), then repaired", key, previous)

    # -- invariants ------------------------------------------------------------------------
    def check_invariants(self, run_started: datetime) -> None:
        from ml.pipeline import safe_run_id
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
            key = f"{MODEL}/runs/{safe_run_id(str(entry.get('run_id')))}/gate.json"
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

    def check_orphans(self, run_started: datetime) -> None:
        keys = self.store.list_keys(f"{MODEL}/")
        key_set = set(keys)
        versions = {k.split("/")[2] for k in keys if k.startswith(f"{MODEL}/versions/")}
        for version in versions:
            prefix = f"{MODEL}/versions/{version}/"
            if prefix + "COMPLETE" not in key_set:
                first = self.store.head(next(k for k in keys if k.startswith(prefix)))
                if first and first["last_modified"] < run_started:
                    self.violation(f"incomplete version {version} left from an earlier run")
        for key in keys:
            parts = key.split("/")
            if len(parts) == 5 and parts[1] == "runs" and parts[4] == "model.keras":
                marker = "/".join(parts[:4]) + "/train_summary.json"
                if marker not in key_set:
                    self.violation(f"candidate {'/'.join(parts[:4])} has files but no marker")
        cutoff = run_started.timestamp()
        for path in (self.root / "work").rglob("*"):
            name = path.name
            temporary = name.startswith(".staging-") or ".tmp-" in name or name.endswith(".part")
            if temporary and path.stat().st_mtime < cutoff:
                self.violation(f"temporary {path} left from an earlier run")

    def check_memory(self) -> None:
        if len(self.rss) < 3:
            return
        third = max(1, len(self.rss) // 3)
        for i, what in enumerate(("SeaweedFS", "soak process")):
            first = sum(r[i] for r in self.rss[:third]) / third
            last = sum(r[i] for r in self.rss[-third:]) / third
            log.info("RSS of %s: %.0f MB (first third) -> %.0f MB (last third)", what, first, last)
            if last - first > RSS_GROWTH_MB and last > first * (1 + RSS_GROWTH_FRACTION):
                self.violation(f"RSS of {what} grew from {first:.0f} MB to {last:.0f} MB")

    def close(self) -> None:
        self.server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="pipeline runs (default 10)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the fault RNG")
    parser.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument("--verbose", action="store_true", help="library logs and Keras progress too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    if not args.verbose:
        logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing notices of back-to-back runs
    root = args.dir or Path(tempfile.mkdtemp(prefix="ml-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    soak = Soak(root, args.seed)
    started = time.monotonic()
    runs_done = 0
    try:
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
    log.info("%d runs in %.0f s", runs_done, time.monotonic() - started)
    print(f"soak: runs={runs_done} faults={len(soak.faults)} invariant_violations={len(soak.violations)}")
    return 1 if soak.violations else 0


if __name__ == "__main__":
    sys.exit(main())
