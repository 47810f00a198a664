"""A real, local Airflow for the demo, the soak and the fault tests: `airflow standalone` + SeaweedFS.

`AirflowStack(root, server)` lays out one folder:

    ROOT/airflow/   AIRFLOW_HOME: SQLite metadata DB, logs, standalone.log, standalone.pid
    ROOT/work/      ML_WORK_DIR: the pipeline's local scratch space

and runs the retraining DAG on a real scheduler, dag-processor, triggerer and api-server
(LocalExecutor), started in their own session so that stopping them stops the whole group.
Object-store credentials reach tasks through the `ml_object_store` connection only.

Task and run states are read straight from the SQLite metadata DB (read-only): a query takes
milliseconds, where each `airflow tasks states-for-dag-run` call costs seconds of imports. This
module imports no Airflow and no TensorFlow; it only starts and watches processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ml.registry.seaweed import SeaweedServer

REPO = Path(__file__).resolve().parent.parent
DAG_ID = "image_classifier_retraining"
TRAINING_POOL_DESCRIPTION = "Concurrent model trainings (size to cores/GPUs)"
TRIGGER_ATTEMPTS = 5
BUCKET = "ml-models"
FINAL_RUN_STATES = ("success", "failed")


def venv_bin() -> Path:
    return Path(sys.executable).parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True)
class TaskState:
    """One task instance as the metadata DB has it now."""

    task_id: str
    map_index: int
    state: str
    try_number: int
    pid: int | None

    @property
    def label(self) -> str:
        return self.task_id + (f"[{self.map_index}]" if self.map_index >= 0 else "")


class StackError(RuntimeError):
    """The stack did not start, or a run did not finish; the message names the log to read."""


class AirflowStack:
    """`airflow standalone` (LocalExecutor, SQLite) wired to a SeaweedFS server, under `root`."""

    def __init__(self, root: Path, server: SeaweedServer | None, *, api_port: int = 8080, bucket: str = BUCKET,
                 parallelism: int = 4, extra_env: Mapping[str, str] | None = None,
                 endpoint_url: str | None = None) -> None:
        self.root = Path(root)
        self.home = self.root / "airflow"
        self.work_dir = self.root / "work"
        self.server = server  # None: only to look at or stop a stack started earlier
        # What tasks connect to: the server itself, or e.g. a fault-injecting proxy in front of it.
        self.endpoint_url = endpoint_url or (server.endpoint_url if server is not None else None)
        self._token: str | None = None
        self.api_port = api_port
        self.bucket = bucket
        self.parallelism = parallelism
        self.extra_env = dict(extra_env or {})
        self.log_ports = (free_port(), free_port())
        self.pid_file = self.home / "standalone.pid"
        self.log_file = self.home / "standalone.log"
        self.db_file = self.home / "airflow.db"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    # -- environment and one-off commands ------------------------------------------------------
    def env(self) -> dict[str, str]:
        """Environment of every airflow process of the stack: home, DAGs, executor, connection."""
        if self.server is None:
            raise StackError("this stack was opened without its object store: it can be stopped, not run")
        conn = {"conn_type": "aws", "login": self.server.access_key, "password": self.server.secret_key,
                "extra": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"}}
        # Nothing of the caller's Airflow or AWS settings leaks in (a test session may have its own home).
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "_AIRFLOW", "AWS_"))}
        return {
            **base,
            "PATH": f"{venv_bin()}{os.pathsep}{os.environ.get('PATH', '')}",  # standalone spawns `airflow`
            "PYTHONPATH": str(REPO),
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            # 2 cores: two trainings at once is the most that helps; more only thrashes.
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(self.parallelism),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.db_file}",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__DAG_FILE_PROCESSOR_TIMEOUT": "120",
            # Two stacks on one machine (a test beside `make up`) must not share the log-server ports.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.log_ports[0]),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self.log_ports[1]),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            # Runs start on demand; a scheduled weekly run would start as soon as the DAG is unpaused.
            "ML_RETRAIN_SCHEDULE": "none",
            "AIRFLOW_CONN_ML_OBJECT_STORE": json.dumps(conn),
            "ML_S3_ENDPOINT_URL": self.endpoint_url or "",
            "ML_S3_BUCKET": self.bucket,
            "ML_WORK_DIR": str(self.work_dir),
            "AWS_EC2_METADATA_DISABLED": "true",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            **self.extra_env,
        }

    def airflow(self, *args: str, check: bool = True, quiet: bool = True) -> subprocess.CompletedProcess:
        """One airflow CLI command in the stack's environment."""
        out = subprocess.PIPE if quiet else None
        done = subprocess.run([str(venv_bin() / "airflow"), *args], env=self.env(), cwd=REPO, stdin=subprocess.DEVNULL,
                              stdout=out, stderr=subprocess.STDOUT if quiet else None, text=True)
        if check and done.returncode != 0:
            tail = "\n".join((done.stdout or "").strip().splitlines()[-15:])
            raise StackError(f"airflow {' '.join(args)} exited {done.returncode}:\n{tail}")
        return done

    def prepare(self, training_slots: int = 2) -> None:
        """Metadata DB and the `training` pool (idempotent)."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.airflow("db", "migrate")
        self.airflow("pools", "set", "training", str(training_slots), TRAINING_POOL_DESCRIPTION)

    # -- the standalone process group ----------------------------------------------------------
    def running(self) -> bool:
        pid = self.pid
        if pid is None:
            return False
        try:
            os.killpg(pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    @property
    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None

    def start(self, timeout: float = 240) -> None:
        """`airflow standalone` in its own session; returns once the api-server answers."""
        if port_taken(self.api_port):
            raise StackError(f"port {self.api_port} is taken by another program; choose another API port "
                             "(ML_DEMO_AIRFLOW_PORT for the demo)")
        self.home.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as logf:
            proc = subprocess.Popen([str(venv_bin() / "airflow"), "standalone"], env=self.env(), cwd=REPO,
                                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self._proc = proc  # kept so that stop() can reap it
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StackError(f"airflow standalone exited with {proc.returncode}; see {self.log_file}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=3):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(2)
        raise StackError(f"the api-server did not answer on {self.url} within {timeout:.0f} s; see {self.log_file}")

    def stop(self, grace: float = 30) -> None:
        """SIGTERM the whole standalone process group (scheduler, api-server, ... outlive their parent
        otherwise), SIGKILL what is left after `grace` seconds."""
        pid = self.pid
        if pid is None:
            return
        proc = getattr(self, "_proc", None)
        try:
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                time.sleep(0.5)
                if proc is not None:
                    proc.poll()  # reap our child: a zombie leader would keep the group "alive"
                os.killpg(pid, 0)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc is not None:
            proc.wait(timeout=10)
        self.pid_file.unlink(missing_ok=True)

    def owns(self, pid: int) -> bool:
        """True when `pid` runs in the stack's session (a process this stack started)."""
        try:
            return self.pid is not None and os.getsid(pid) == self.pid
        except OSError:
            return False

    def _session_processes(self) -> list[tuple[int, int, str]]:
        """(pid, parent pid, command line) of every process in the stack's session."""
        found = []
        if self.pid is None:
            return found
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or not self.owns(int(entry.name)):
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except (OSError, IndexError, ValueError):
                continue
            found.append((int(entry.name), ppid, argv))
        return found

    def components(self) -> dict[str, list[int]]:
        """PIDs of the stack's long-lived processes by role: scheduler, dag-processor, api-server,
        triggerer (standalone's children) and executor-workers (the LocalExecutor's worker pool)."""
        roles: dict[str, list[int]] = {}
        for pid, ppid, argv in self._session_processes():
            words = argv.split()
            if ppid == self.pid:
                role = next((w.replace("_", "-") for w in words[:4]
                             if w in ("scheduler", "dag-processor", "api-server", "api_server", "triggerer")), None)
            elif argv.startswith("airflow worker -- LocalExecutor"):
                role = "executor-workers"  # task processes are their forks, titled "airflow worker -- <ti id>"
            else:
                role = None
            if role:
                roles.setdefault(role, []).append(pid)
        return roles

    # -- runs ----------------------------------------------------------------------------------
    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        if not self.db_file.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db_file}?mode=ro", uri=True, timeout=30)
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:  # the schema is not there yet (before migrate)
            if "no such table" in str(exc):
                return []
            raise
        finally:
            conn.close()

    def dag_parsed(self, dag_id: str = DAG_ID) -> bool:
        return bool(self._query("SELECT 1 FROM serialized_dag WHERE dag_id = ?", (dag_id,)))

    def wait_for_dag(self, dag_id: str = DAG_ID, timeout: float = 180) -> None:
        """Until the dag-processor has parsed and serialized the DAG."""
        deadline = time.monotonic() + timeout
        while not self.dag_parsed(dag_id):
            if time.monotonic() > deadline:
                raise StackError(f"the DAG {dag_id} was not parsed within {timeout:.0f} s; see {self.log_file}")
            if not self.running():
                raise StackError(f"airflow standalone stopped; see {self.log_file}")
            time.sleep(2)

    def trigger(self, conf: Mapping[str, Any], run_id: str, dag_id: str = DAG_ID, *,
                logical_date: datetime | None = None) -> str:
        """A manual run with logical date now (or `logical_date`), as the UI's trigger form makes it (the deadline
        alert counts from it).

        Through the REST API: an `airflow dags trigger` process costs 10-30 s of imports on a busy 2-core machine.
        """
        self.api("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        when = (logical_date or datetime.now(UTC)).isoformat()  # to the microsecond: logical dates are unique per DAG
        body = {"dag_run_id": run_id, "logical_date": when, "conf": dict(conf)}
        # SQLite under load: the api-server answers 500 "Database error" when the scheduler holds the write
        # lock (seen on the audit-log insert); the request is rolled back, so it is safe to send again.
        for attempt in range(1, TRIGGER_ATTEMPTS + 1):
            try:
                self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", body)
                return run_id
            except StackError as exc:
                if attempt > 1 and "HTTP 409" in str(exc):
                    return run_id  # an earlier attempt did create it after all
                if "HTTP 500" not in str(exc) or attempt == TRIGGER_ATTEMPTS:
                    raise
                time.sleep(2 * attempt)
        return run_id

    def set_pool(self, name: str, slots: int, description: str) -> None:
        """Create or resize a pool on the running stack (REST; `prepare` does the same through the CLI)."""
        body = {"name": name, "slots": slots, "description": description, "include_deferred": False}
        try:
            self.api("POST", "/api/v2/pools", body)
        except StackError as exc:
            if "HTTP 409" not in str(exc):
                raise
            self.api("PATCH", f"/api/v2/pools/{name}", body)

    def run_state(self, run_id: str, dag_id: str = DAG_ID) -> str:
        rows = self._query("SELECT state FROM dag_run WHERE dag_id = ? AND run_id = ?", (dag_id, run_id))
        return (rows[0][0] if rows else None) or "queued"

    def run_times(self, run_id: str, dag_id: str = DAG_ID) -> tuple[str | None, str | None]:
        """(start_date, end_date) of a run as the metadata DB stores them (UTC, sortable text)."""
        rows = self._query("SELECT start_date, end_date FROM dag_run WHERE dag_id = ? AND run_id = ?",
                           (dag_id, run_id))
        return (rows[0][0], rows[0][1]) if rows else (None, None)

    def tasks(self, run_id: str, dag_id: str = DAG_ID) -> list[TaskState]:
        rows = self._query("SELECT task_id, map_index, state, try_number, pid FROM task_instance "
                           "WHERE dag_id = ? AND run_id = ? ORDER BY start_date, task_id, map_index",
                           (dag_id, run_id))
        return [TaskState(t, int(m), s or "none", int(n or 0), p) for t, m, s, n, p in rows]

    def task(self, run_id: str, task_id: str, map_index: int = -1, dag_id: str = DAG_ID) -> TaskState | None:
        return next((t for t in self.tasks(run_id, dag_id) if t.task_id == task_id and t.map_index == map_index), None)

    def tries(self, run_id: str, task_id: str, map_index: int = -1, dag_id: str = DAG_ID) -> list[tuple[int, str]]:
        """(try_number, state) of the task's earlier tries (Airflow's task_instance_history)."""
        rows = self._query("SELECT try_number, state FROM task_instance_history WHERE dag_id = ? AND run_id = ? "
                           "AND task_id = ? AND map_index = ? ORDER BY try_number",
                           (dag_id, run_id, task_id, map_index))
        return [(int(n), s) for n, s in rows]

    def wait_run(self, run_id: str, *, timeout: float = 1800, dag_id: str = DAG_ID,
                 on_task: Callable[[TaskState], None] | None = None, poll: float = 1.0) -> str:
        """Poll until the run ends; `on_task` sees every task whose state changed. Returns the run state."""
        seen: dict[str, tuple[str, int]] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ti in self.tasks(run_id, dag_id):
                if seen.get(ti.label) != (ti.state, ti.try_number):
                    seen[ti.label] = (ti.state, ti.try_number)
                    if on_task is not None:
                        on_task(ti)
            state = self.run_state(run_id, dag_id)
            if state in FINAL_RUN_STATES:
                return state
            if not self.running():
                raise StackError(f"airflow standalone stopped during run {run_id}; see {self.log_file}")
            time.sleep(poll)
        return "timed out"

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """One call of the REST API as standalone's admin user (logs in on first use, and again once on a 401)."""
        for attempt in (1, 2):
            if self._token is None:
                passwords = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())
                user, password = next(iter(passwords.items()))
                self._token = self._http("POST", "/auth/token",
                                         {"username": user, "password": password})["access_token"]
            try:
                return self._http(method, path, body, token=self._token)
            except StackError as exc:
                if "HTTP 401" not in str(exc) or attempt == 2:
                    raise
                self._token = None  # expired (long soaks) or the stack restarted with a new secret
        raise AssertionError("unreachable")

    def _http(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        request = urllib.request.Request(self.url + path, method=method,
                                         data=json.dumps(body).encode() if body is not None else None)
        request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            raise StackError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:500]!r}") from exc
        return json.loads(payload) if payload else None

    def clear_failed(self, run_id: str, dag_id: str = DAG_ID) -> list[str]:
        """Clear a run's failed tasks and their downstream (the UI's "Clear failed"); returns what was cleared."""
        done = self.api("POST", f"/api/v2/dags/{dag_id}/clearTaskInstances",
                        {"dag_run_id": run_id, "only_failed": True, "include_downstream": True, "dry_run": False,
                         "reset_dag_runs": True})
        return sorted(f"{t['task_id']}[{t.get('map_index', -1)}]" for t in (done or {}).get("task_instances", []))

    def task_log(self, run_id: str, task_id: str, map_index: int = -1, try_number: int = 1) -> str:
        """The task's log file text ('' when there is none yet)."""
        folder = self.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / f"task_id={task_id}"
        if map_index >= 0:
            folder = folder / f"map_index={map_index}"
        path = folder / f"attempt={try_number}.log"
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""
