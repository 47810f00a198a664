"""The embedded demo stack: `make demo`, `make up`, `make down`, `make status`.

Everything lives under `.demo/` in the repository (ignored by git, removed by `make clean`):

    .demo/data/sample/     the generated sample dataset (Kaggle dog-breed layout)
    .demo/seaweed/         SeaweedFS data, log and state.json (endpoint + generated credentials, mode 600)
    .demo/airflow/         AIRFLOW_HOME: SQLite metadata DB, logs, standalone's admin password
    .demo/work/            the pipeline's local scratch space (datasets, caches, run folders)
    .demo/weights/         backbone weights the demo pretrained offline (by recipe key; reused)

The demo's training settings are config/demo.yaml (ML_CONFIG of the stack it starts).

Only processes started here are stopped here, by the PIDs recorded in those folders.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ml.registry.seaweed import SeaweedServer  # noqa: E402
from scripts.airflow_stack import (  # noqa: E402
    BUCKET,
    DAG_ID,
    TRAINING_POOL_DESCRIPTION,
    AirflowStack,
    StackError,
    TaskState,
)

DEMO = REPO / ".demo"
SEAWEED_DIR = DEMO / "seaweed"
AIRFLOW_HOME = DEMO / "airflow"
WORK_DIR = DEMO / "work"
SAMPLE_DIR = DEMO / "data" / "sample"
WEIGHTS_DIR = DEMO / "weights"
DEMO_CONFIG = REPO / "config" / "demo.yaml"
API_PORT = int(os.environ.get("ML_DEMO_AIRFLOW_PORT", "8080"))
RUN_TIMEOUT_S = 1800
TRAINING_SLOTS = 2  # the demo trains its two candidates side by side
MODEL_NAME = "image-classifier"

# Sized with config/demo.yaml so the whole demo (two candidates + one fine-tune) takes ~3 minutes on 2 cores.
SAMPLE = {"classes": 5, "per_class": 150, "size": 64, "seed": 7}
DEMO_PARAMS = {"force": True}


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def start_store() -> SeaweedServer:
    """The demo's SeaweedFS: adopt a running one, else start it (keeping its credentials)."""
    state = SEAWEED_DIR / "state.json"
    if state.exists():
        server = SeaweedServer.from_state(SEAWEED_DIR)
        if server.is_running():
            say(f"object store already running at {server.endpoint_url} (pid {server.pid})")
            return server
        creds = json.loads(state.read_text())
        server = SeaweedServer(SEAWEED_DIR, access_key=creds["access_key"], secret_key=creds["secret_key"])
    else:
        server = SeaweedServer(SEAWEED_DIR)
    server.start(detach=True)
    say(f"object store (SeaweedFS) started at {server.endpoint_url} (pid {server.pid}, "
        f"{server.startup_seconds:.1f} s)")
    demo_store(server).ensure_bucket()
    return server


def demo_store(server: SeaweedServer):
    from ml.registry.store import ObjectStore

    return ObjectStore(BUCKET, endpoint_url=server.endpoint_url, access_key=server.access_key,
                       secret_key=server.secret_key)


def demo_stack(server: SeaweedServer | None) -> AirflowStack:
    """The demo's Airflow: home .demo/airflow, work dir .demo/work, API on API_PORT, config/demo.yaml."""
    return AirflowStack(DEMO, server, api_port=API_PORT, bucket=BUCKET, extra_env={"ML_CONFIG": str(DEMO_CONFIG)})


def demo_weights() -> str:
    """The transfer candidates' ``weights``: ImageNet when cached or reachable, else pretrained here.

    Offline, a frozen random backbone leaves the transfer rows at chance; a backbone pretrained once
    on a different generated task (`ml.models.pretext`, cached in .demo/weights/) transfers instead.
    """
    from ml.config import PipelineConfig
    from ml.errors import ConfigError
    from ml.models.registry import get_architecture
    from ml.models.weights import imagenet_source, keras_models_dir, resolve_weights

    train = PipelineConfig.load(DEMO_CONFIG).train
    candidate = next(c for c in train.candidates if c.startswith("transfer_"))
    spec = get_architecture(candidate.removeprefix("transfer_"))
    alpha = train.options_for(candidate).get("alpha")
    file_name = spec.weights_file_name(train.image_size, alpha)
    source = imagenet_source(spec, train.image_size, alpha=alpha)
    if source == "cached":
        say(f"weights: ImageNet ({file_name} is in the Keras cache {keras_models_dir()}); {candidate} uses it")
        return "imagenet"
    if source == "reachable":
        try:
            resolve_weights("imagenet", spec, train.image_size, alpha=alpha, cache_dir=WEIGHTS_DIR)
            say(f"weights: ImageNet ({file_name}, downloaded into {keras_models_dir()}); {candidate} uses it")
            return "imagenet"
        except ConfigError as exc:
            say(f"weights: ImageNet download failed ({exc})")
    from ml.models.pretext import PretextRecipe, pretext_weights

    started = time.perf_counter()
    info = pretext_weights(WEIGHTS_DIR, PretextRecipe(architecture=spec.name, alpha=alpha,
                                                      image_size=train.image_size))
    done = "reused" if info["cached"] else f"trained in {time.perf_counter() - started:.0f} s"
    say(f"weights: OFFLINE - no ImageNet file {file_name} in {keras_models_dir()} and "
        f"{'no network' if source == 'offline' else 'no download'}. {candidate} transfers instead from a "
        f"{spec.name} backbone pretrained here on a different generated task ({len(info['classes'])} classes "
        f"such as {info['classes'][0]}, none of the sample's; held-out accuracy "
        f"{info['held_out_accuracy']:.0%}), {done}: {Path(info['path']).relative_to(REPO)}")
    say(f"weights: with ImageNet weights (online, or {file_name} pre-staged in {keras_models_dir()}) the demo "
        f"would use those instead - the real thing for photos; this stand-in only shows the mechanics")
    return info["path"]


def start_airflow(stack: AirflowStack) -> None:
    """`airflow standalone` (it migrates its SQLite database itself), then the `training` pool through REST."""
    start_standalone(stack)
    stack.set_pool("training", TRAINING_SLOTS, TRAINING_POOL_DESCRIPTION)
    say(f"Airflow home {AIRFLOW_HOME.relative_to(REPO)} (SQLite, LocalExecutor); pool training: {TRAINING_SLOTS} slots")


def ensure_sample() -> Path:
    if (SAMPLE_DIR / "labels.csv").exists():
        return SAMPLE_DIR
    from ml.data.sample import make_sample_dataset

    info = make_sample_dataset(SAMPLE_DIR, **SAMPLE)
    say(f"sample dataset: {info['n_images']} JPEGs of {len(info['classes'])} classes in "
        f"{SAMPLE_DIR.relative_to(REPO)} (Kaggle dog-breed layout)")
    return SAMPLE_DIR


def print_outcome(server: SeaweedServer, run_id: str | None) -> int:
    from ml.evaluation.leaderboard import format_leaderboard_table
    from ml.registry.versions import promotion_history, read_pointer

    store = demo_store(server)
    history = promotion_history(store, MODEL_NAME)
    entry = next((e for e in reversed(history) if run_id is None or e.get("run_id") == run_id), None)
    if entry is None:
        say("the run recorded no gate decision (see the task logs under .demo/airflow/logs)")
        return 1
    from ml.registry.layout import REPORT_FILE, run_key

    report = store.get_json(run_key(MODEL_NAME, entry["run_id"], REPORT_FILE))
    print()
    print(format_leaderboard_table(report["leaderboard"], production=report.get("production")))
    print()
    pointer, _ = read_pointer(store, MODEL_NAME)
    if entry["action"] == "promote":
        say(f"PROMOTED {entry['to']}: " + "; ".join(entry.get("reasons", [])))
    else:
        say(f"KEPT production {entry['from']}: " + "; ".join(entry.get("reasons", [])))
    if pointer:
        say(f"production model: {pointer['uri']} (version {pointer['version']}, "
            f"test accuracy {pointer['metrics'].get('accuracy', float('nan')):.3f})")
    report_key = run_key(MODEL_NAME, entry["run_id"], "report.html")
    say(f"run report: {store.uri(report_key)}")
    return 0


def trigger_and_wait(stack: AirflowStack, conf: dict) -> tuple[str, str]:
    """Trigger a run with `conf`, print task progress, return (run_id, final state)."""
    run_id = stack.trigger(conf, "demo__" + time.strftime("%Y%m%dT%H%M%S", time.gmtime()))
    say(f"triggered run {run_id}; follow it at http://localhost:{API_PORT}/dags/{DAG_ID}")

    def progress(ti: TaskState) -> None:
        if ti.state in ("running", "success", "failed", "skipped", "up_for_retry"):
            say(f"  {ti.label:36} {ti.state}" + (f" (try {ti.try_number})" if ti.try_number > 1 else ""))

    return run_id, stack.wait_run(run_id, timeout=RUN_TIMEOUT_S, on_task=progress, poll=2)


def cmd_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    source = ensure_sample()
    # Weights (a download, or ~half a minute of pretraining offline) while the services start.
    background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="demo-weights")
    weights = background.submit(demo_weights)
    background.shutdown(wait=False)
    server = start_store()
    stack = demo_stack(server)
    already_up = stack.running()
    stop_all = not args.keep_running and not already_up
    try:
        if not already_up:
            start_airflow(stack)
        stack.wait_for_dag()
        conf = {**DEMO_PARAMS, "source": str(source), "weights": weights.result()}
        say(f"running DAG {DAG_ID} on airflow standalone (LocalExecutor; trainings run in parallel) ...")
        run_id, state = trigger_and_wait(stack, conf)
        code = print_outcome(server, run_id)
        if state != "success":
            say(f"the DAG run ended {state}; task logs: {AIRFLOW_HOME / 'logs'} (or the UI with `make up`)")
            return 1
        say(f"demo finished in {time.perf_counter() - started:.0f} s. `make up` shows it at "
            f"http://localhost:{API_PORT}; then try: .venv/bin/python -m ml predict --model production "
            f"{SAMPLE_DIR.relative_to(REPO)}/test/<image>.jpg")
        return code
    finally:
        if stop_all:
            stop_standalone(stack)
            server.stop()
            say("airflow and the object store stopped")


def cmd_up(args: argparse.Namespace) -> int:
    server = start_store()
    stack = demo_stack(server)
    if stack.running():
        say(f"airflow standalone already running (pid {stack.pid})")
    else:
        start_airflow(stack)
    password_file = AIRFLOW_HOME / "simple_auth_manager_passwords.json.generated"
    if password_file.exists():
        password_file.chmod(0o600)
    # The password stays in its file: terminal output ends up in CI logs and screen shares.
    say(f"Airflow UI: http://localhost:{API_PORT}  (user admin; password in {password_file.relative_to(REPO)})")
    say(f"object store: {server.endpoint_url}  (credentials in {SEAWEED_DIR.relative_to(REPO)}/state.json)")
    say("stop with: make down")
    return 0


def start_standalone(stack: AirflowStack) -> None:
    say(f"starting airflow standalone (log {stack.log_file.relative_to(REPO)}); waiting for it")
    stack.start()
    say(f"airflow standalone started (pid {stack.pid})")


def stop_standalone(stack: AirflowStack) -> None:
    pid = stack.pid
    if pid is not None:
        stack.stop()
        say(f"airflow standalone (process group {pid}) stopped")


def _recorded_store() -> SeaweedServer | None:
    """The demo's SeaweedFS as its state.json records it (None before the first start)."""
    return SeaweedServer.from_state(SEAWEED_DIR) if (SEAWEED_DIR / "state.json").exists() else None


def cmd_down(args: argparse.Namespace) -> int:
    server = _recorded_store()
    stop_standalone(demo_stack(server))
    if server is not None and server.is_running():
        server.stop()
        say("object store stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    server = _recorded_store()
    say(f"airflow standalone: {'running' if demo_stack(server).running() else 'stopped'}")
    running = server is not None and server.is_running()
    say(f"object store: {'running at ' + str(server.endpoint_url) if running else 'stopped'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the DAG end to end on the sample dataset")
    demo.add_argument("--keep-running", action="store_true", help="leave the object store running afterwards")
    demo.set_defaults(func=cmd_demo)
    sub.add_parser("up", help="start the object store and airflow standalone").set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop them").set_defaults(func=cmd_down)
    sub.add_parser("status", help="what is running").set_defaults(func=cmd_status)
    args = parser.parse_args()
    try:
        return args.func(args)
    except StackError as exc:
        say(str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
