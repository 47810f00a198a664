"""The embedded demo stack: `make demo`, `make up`, `make down`, `make status`.

Everything lives under `.demo/` in the repository (ignored by git, removed by `make clean`):

    .demo/data/sample/     the generated sample dataset (Kaggle dog-breed layout)
    .demo/seaweed/         SeaweedFS data, log and state.json (endpoint + generated credentials, mode 600)
    .demo/airflow/         AIRFLOW_HOME: SQLite metadata DB, logs, standalone's admin password
    .demo/work/            the pipeline's local scratch space (datasets, caches, run folders)

Only processes started here are stopped here, by the PIDs recorded in those folders.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ml.registry.seaweed import SeaweedServer  # noqa: E402

DEMO = REPO / ".demo"
SEAWEED_DIR = DEMO / "seaweed"
AIRFLOW_HOME = DEMO / "airflow"
WORK_DIR = DEMO / "work"
SAMPLE_DIR = DEMO / "data" / "sample"
STANDALONE_PID = AIRFLOW_HOME / "standalone.pid"
STANDALONE_LOG = AIRFLOW_HOME / "standalone.log"
DAG_ID = "image_classifier_retraining"
API_PORT = int(os.environ.get("ML_DEMO_AIRFLOW_PORT", "8080"))
RUN_TIMEOUT_S = 1800
BUCKET = "ml-models"
MODEL_NAME = "image-classifier"

# Sized so the whole demo (two candidates + one fine-tune) takes a few minutes on 2 cores.
SAMPLE = {"classes": 5, "per_class": 150, "size": 64, "seed": 7}
DEMO_PARAMS = {"epochs": 15, "image_size": 64, "candidates": ["scratch_small", "transfer_mobilenet_v2"],
               "finetune_top_k": 1, "force": True}


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def venv_bin() -> Path:
    return Path(sys.executable).parent


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


def airflow_env(server: SeaweedServer) -> dict[str, str]:
    """Environment for every airflow command of the demo: home, DAGs, executor, connection."""
    conn = {"conn_type": "aws", "login": server.access_key, "password": server.secret_key,
            "extra": {"endpoint_url": server.endpoint_url, "region_name": "us-east-1"}}
    env = {
        **os.environ,
        "PATH": f"{venv_bin()}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # 2 cores: two trainings at once is the most that helps; more only thrashes.
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "4",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME / 'airflow.db'}",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(API_PORT),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{API_PORT}/execution/",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        # The demo runs on demand; a scheduled weekly run would start as soon as the DAG is unpaused.
        "ML_RETRAIN_SCHEDULE": "none",
        # Local executor: one worker per core is what 2 cores can use.
        "AIRFLOW__CORE__DAG_FILE_PROCESSOR_TIMEOUT": "120",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW_CONN_ML_OBJECT_STORE": json.dumps(conn),
        "ML_S3_ENDPOINT_URL": server.endpoint_url or "",
        "ML_S3_BUCKET": BUCKET,
        "ML_WORK_DIR": str(WORK_DIR),
        "AWS_EC2_METADATA_DISABLED": "true",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    # The demo's keys travel in the connection only; never in the process environment of tasks.
    env.pop("AWS_ACCESS_KEY_ID", None)
    env.pop("AWS_SECRET_ACCESS_KEY", None)
    return env


def airflow(env: dict[str, str], *args: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    cmd = [str(venv_bin() / "airflow"), *args]
    out = subprocess.DEVNULL if quiet else None
    return subprocess.run(cmd, env=env, cwd=REPO, check=check, stdout=out, stderr=out)


def prepare_airflow(env: dict[str, str]) -> None:
    AIRFLOW_HOME.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    airflow(env, "db", "migrate", quiet=True)
    airflow(env, "pools", "set", "training", "2", "Concurrent model trainings (size to cores/GPUs)", quiet=True)
    say(f"Airflow home {AIRFLOW_HOME.relative_to(REPO)} ready (SQLite, LocalExecutor) "
        f"in {time.perf_counter() - started:.0f} s")


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
    from ml.pipeline import safe_run_id

    report = store.get_json(f"{MODEL_NAME}/runs/{safe_run_id(entry['run_id'])}/report.json")
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
    report_key = f"{MODEL_NAME}/runs/{safe_run_id(entry['run_id'])}/report.html"
    say(f"run report: {store.uri(report_key)}")
    return 0


def airflow_json(env: dict[str, str], *args: str) -> object:
    out = subprocess.run([str(venv_bin() / "airflow"), *args, "-o", "json"], env=env, cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"airflow {' '.join(args)} failed: {out.stderr.strip().splitlines()[-1:]}")
    # Airflow may print log lines before the JSON: parse from the first line that is JSON.
    lines = out.stdout.strip().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("[{", "[]", "{")) or line in ("[", "{"):
            return json.loads("\n".join(lines[i:]))
    return None


def wait_for_dag(env: dict[str, str], timeout: float = 180) -> None:
    """Until the dag-processor has parsed and serialized the DAG."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            dags = airflow_json(env, "dags", "list")
        except RuntimeError:
            dags = []
        if any(d.get("dag_id") == DAG_ID for d in dags or []):
            return
        time.sleep(3)
    raise SystemExit(f"[demo] the DAG {DAG_ID} was not parsed within {timeout:.0f} s; see {STANDALONE_LOG}")


def trigger_and_wait(env: dict[str, str], conf: dict) -> tuple[str, str]:
    """Trigger a run with `conf`, print task progress, return (run_id, final state)."""
    run_id = "demo__" + time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    airflow(env, "dags", "unpause", DAG_ID, quiet=True, check=False)
    airflow(env, "dags", "trigger", DAG_ID, "--run-id", run_id, "--conf", json.dumps(conf), quiet=True)
    say(f"triggered run {run_id}; follow it at http://localhost:{API_PORT}/dags/{DAG_ID}")
    seen: dict[str, str] = {}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        time.sleep(5)
        try:
            tis = airflow_json(env, "tasks", "states-for-dag-run", DAG_ID, run_id) or []
        except RuntimeError:
            continue
        for ti in tis:
            index = str(ti.get("map_index") if ti.get("map_index") is not None else "-1")
            label = ti["task_id"] + (f"[{index}]" if index not in ("-1", "") else "")
            state = ti.get("state") or "none"
            if seen.get(label) != state and state in ("running", "success", "failed", "skipped", "up_for_retry"):
                say(f"  {label:36} {state}")
            seen[label] = state
        runs = airflow_json(env, "dags", "list-runs", DAG_ID) or []
        state = next((r["state"] for r in runs if r["run_id"] == run_id), "queued")
        if state in ("success", "failed"):
            return run_id, state
    return run_id, "timed out"


def cmd_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    source = ensure_sample()
    server = start_store()
    already_up = _standalone_running()
    stop_all = not args.keep_running and not already_up
    try:
        env = airflow_env(server)
        if not already_up:
            prepare_airflow(env)
            start_standalone(env)
        wait_for_dag(env)
        conf = {**DEMO_PARAMS, "source": str(source)}
        say(f"running DAG {DAG_ID} on airflow standalone (LocalExecutor; trainings run in parallel) ...")
        run_id, state = trigger_and_wait(env, conf)
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
            stop_standalone()
            server.stop()
            say("airflow and the object store stopped")


def _standalone_running() -> bool:
    if not STANDALONE_PID.exists():
        return False
    try:
        pid = int(STANDALONE_PID.read_text())
        os.kill(pid, 0)
        return True
    except (ValueError, ProcessLookupError, PermissionError):
        return False


def cmd_up(args: argparse.Namespace) -> int:
    server = start_store()
    env = airflow_env(server)
    prepare_airflow(env)
    if _standalone_running():
        say(f"airflow standalone already running (pid {STANDALONE_PID.read_text().strip()})")
    else:
        start_standalone(env)
    password_file = AIRFLOW_HOME / "simple_auth_manager_passwords.json.generated"
    password = json.loads(password_file.read_text()).get("admin") if password_file.exists() else "(see log)"
    say(f"Airflow UI: http://localhost:{API_PORT}  (user admin, password {password})")
    say(f"object store: {server.endpoint_url}  (credentials in {SEAWEED_DIR.relative_to(REPO)}/state.json)")
    say("stop with: make down")
    return 0


def start_standalone(env: dict[str, str]) -> None:
    """`airflow standalone` in its own session (so stopping it stops its whole process group)."""
    _check_port_free(API_PORT)
    with STANDALONE_LOG.open("ab") as logf:
        proc = subprocess.Popen([str(venv_bin() / "airflow"), "standalone"], env=env, cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    STANDALONE_PID.write_text(str(proc.pid))
    say(f"airflow standalone started (pid {proc.pid}, log {STANDALONE_LOG.relative_to(REPO)}); waiting for it")
    _wait_http(f"http://127.0.0.1:{API_PORT}/api/v2/monitor/health", timeout=240)


def _check_port_free(port: int) -> None:
    import socket

    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            raise SystemExit(f"[demo] port {port} is taken by another program; set ML_DEMO_AIRFLOW_PORT to a free port")


def stop_standalone() -> None:
    if not STANDALONE_PID.exists():
        return
    pid = int(STANDALONE_PID.read_text())
    try:
        # standalone spawns scheduler, triggerer, dag-processor and api-server in its session:
        # signal the whole group, or they outlive it.
        os.killpg(pid, signal.SIGTERM)
        for _ in range(60):
            time.sleep(0.5)
            os.killpg(pid, 0)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    STANDALONE_PID.unlink(missing_ok=True)
    say(f"airflow standalone (process group {pid}) stopped")


def _wait_http(url: str, timeout: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=3):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(2)
    say(f"warning: {url} did not answer within {timeout:.0f} s; see {STANDALONE_LOG}")


def cmd_down(args: argparse.Namespace) -> int:
    stop_standalone()
    if (SEAWEED_DIR / "state.json").exists():
        server = SeaweedServer.from_state(SEAWEED_DIR)
        if server.is_running():
            server.stop()
            say("object store stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    say(f"airflow standalone: {'running' if _standalone_running() else 'stopped'}")
    if (SEAWEED_DIR / "state.json").exists():
        server = SeaweedServer.from_state(SEAWEED_DIR)
        say(f"object store: {'running at ' + str(server.endpoint_url) if server.is_running() else 'stopped'}")
    else:
        say("object store: never started")
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
