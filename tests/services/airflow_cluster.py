"""A production-shaped Airflow on one host, for the `services` tests.

CeleryExecutor, a PostgreSQL metadata database and a Redis broker, with the services and
commands of `docker/docker-compose.yaml` run as local processes. Everything this module
starts is owned by it: a scratch database, one Redis database index under a key prefix, and
processes in their own sessions, stopped by process group. Nothing else is touched.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.airflow_stack import free_port  # noqa: F401 - re-exported for the services tests

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker" / "docker-compose.yaml"
VENV_BIN = Path(sys.executable).parent
AIRFLOW = VENV_BIN / "airflow"


# --------------------------------------------------------------------------- reachability, ports


def tcp_reachable(host: str, port: int, timeout: float = 2.0) -> str | None:
    """None when something accepts TCP connections at host:port, else the reason it does not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port} is unreachable ({exc})"


# --------------------------------------------------------------------------- docker-compose.yaml


def compose_services(path: Path = COMPOSE_FILE) -> dict[str, dict[str, Any]]:
    """The compose file's services, YAML anchors and `<<` merges resolved (no variable substitution)."""
    import yaml

    return yaml.safe_load(path.read_text())["services"]


_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|:\?|-|\?)(?P<arg>[^}]*))?\}")


def substitute(text: str, variables: Mapping[str, str]) -> str:
    """Compose-style `${NAME}`, `${NAME:-default}` and `${NAME:?error}` substitution.

    Raises:
        KeyError: a `${NAME:?...}` or `${NAME}` variable is not in `variables`.
    """

    def value(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        found = variables.get(name)
        if found:
            return found
        if op in (":-", "-"):
            return arg or ""
        raise KeyError(f"compose variable {name} is not set ({arg or 'required'})")

    return _VARIABLE.sub(value, text)


def service_command(service: Mapping[str, Any], variables: Mapping[str, str]) -> list[str]:
    """A compose service's command as argv for this host (the airflow image's entrypoint is `airflow`)."""
    command = service["command"]
    args = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    args = [substitute(a, variables) for a in args]
    entrypoint = service.get("entrypoint")
    if entrypoint:
        return [*([entrypoint] if isinstance(entrypoint, str) else list(entrypoint)), *args]
    return [str(AIRFLOW), *args]


# --------------------------------------------------------------------------- PostgreSQL and Redis


class ScratchDatabase:
    """A fresh PostgreSQL database, created on `create()` and dropped (with its sessions) on `drop()`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5432, user: str = "postgres",
                 prefix: str = "ml_celery_test") -> None:
        self.host, self.port, self.user = host, port, user
        self.name = f"{prefix}_{secrets.token_hex(4)}"

    def _connect(self, dbname: str, timeout: int = 2):
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user, dbname=dbname,
                                connect_timeout=timeout)
        conn.autocommit = True
        return conn

    def check(self) -> str | None:
        """None when the server accepts this user on the `postgres` database, else why not."""
        try:
            self._connect("postgres").close()
        except Exception as exc:  # noqa: BLE001 - any failure means "skip", with its reason
            return f"PostgreSQL at {self.host}:{self.port} (user {self.user}): {type(exc).__name__}: {exc}".strip()
        return None

    def create(self) -> None:
        conn = self._connect("postgres")
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{self.name}"')
        finally:
            conn.close()

    def drop(self) -> None:
        conn = self._connect("postgres")
        try:
            with conn.cursor() as cur:
                # FORCE (PostgreSQL 13+) ends sessions a killed process may have left behind.
                cur.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            conn.close()

    def url(self, scheme: str = "postgresql+psycopg2") -> str:
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{self.name}"

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Rows of one read-only query on the scratch database."""
        conn = self._connect(self.name)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall())
        finally:
            conn.close()


class ScratchRedis:
    """One Redis database index, claimed only if empty; every key under `prefix` deleted at the end."""

    def __init__(self, host: str = "127.0.0.1", port: int = 6379, db: int = 13,
                 prefix: str | None = None) -> None:
        self.host, self.port, self.db = host, port, db
        self.prefix = prefix or f"ml_celery_test_{secrets.token_hex(4)}:"

    def _client(self):
        import redis

        return redis.Redis(host=self.host, port=self.port, db=self.db, socket_timeout=2, socket_connect_timeout=2)

    def claim(self) -> str | None:
        """None when the server answers and database `db` is empty, else why it cannot be used."""
        try:
            size = self._client().dbsize()
        except Exception as exc:  # noqa: BLE001 - any failure means "skip", with its reason
            return f"Redis at {self.host}:{self.port}: {type(exc).__name__}: {exc}"
        if size:
            return f"Redis database {self.db} at {self.host}:{self.port} holds {size} keys: not ours to use"
        return None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"

    def keys(self) -> list[str]:
        return sorted(k.decode() for k in self._client().scan_iter(count=500))

    def cleanup(self) -> list[str]:
        """Delete our prefixed keys; return any other keys left in the database (not deleted)."""
        client = self._client()
        ours = list(client.scan_iter(match=self.prefix + "*", count=500))
        if ours:
            client.delete(*ours)
        return self.keys()


# --------------------------------------------------------------------------- processes


@dataclass
class Service:
    name: str
    argv: list[str]
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class ClusterError(RuntimeError):
    """A cluster process died or did not become ready; the message carries its log tail."""


class AirflowCluster:
    """Airflow processes sharing one environment; each in its own session, logs in `log_dir`."""

    def __init__(self, env: Mapping[str, str], log_dir: Path) -> None:
        self.env = dict(env)
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.services: dict[str, Service] = {}
        self.started: dict[str, list[str]] = {}  # every service ever started: name -> argv

    def run(self, argv: Sequence[str], *, name: str, timeout: float = 300,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """A one-off command (airflow CLI, init script); raises ClusterError with its output on failure."""
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as logf:
            done = subprocess.run(list(argv), env={**self.env, **(env or {})}, cwd=REPO, stdin=subprocess.DEVNULL,
                                  stdout=logf, stderr=subprocess.STDOUT, timeout=timeout, start_new_session=True)
        if done.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            raise ClusterError(f"{name} ({shlex.join(argv)[:200]}) exited {done.returncode}:\n{tail}")
        return done

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Service:
        """Start a long-running process in a new session (so its whole process group can be stopped)."""
        merged = {**self.env, **(env or {})}
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as logf:
            proc = subprocess.Popen(list(argv), env=merged, cwd=REPO, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        service = Service(name, list(argv), proc, log_path, merged)
        self.services[name] = service
        self.started[name] = list(argv)
        return service

    def check_alive(self, names: Iterable[str] | None = None) -> None:
        for name in names or list(self.services):
            service = self.services[name]
            code = service.process.poll()
            if code is not None:
                raise ClusterError(f"{name} exited with {code}; log {service.log_path}:\n{service.log_tail()}")

    def stop(self, name: str, timeout: float = 20) -> None:
        """SIGTERM the service's process group, SIGKILL it after `timeout` s (only our own group)."""
        service = self.services.pop(name, None)
        if service is None:
            return
        pgid = service.pid  # the session leader: start_new_session makes pid == pgid == sid
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            service.process.poll()
            if not _group_alive(pgid):
                break
            time.sleep(0.2)
        else:
            _signal_group(pgid, signal.SIGKILL)
        try:
            service.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def stop_all(self) -> None:
        # Workers first (they hold task processes), the api-server last (tasks report to it).
        order = sorted(self.services, key=lambda n: (not n.startswith("worker"), n == "api-server"))
        for name in order:
            self.stop(name)

    def session_of(self, pid: int) -> str | None:
        """Which of our services a running process belongs to (by session id), or None."""
        try:
            sid = os.getsid(pid)
        except OSError:
            return None
        return next((name for name, s in self.services.items() if s.pid == sid), None)

    def wait_for(self, what: str, probe, timeout: float, interval: float = 1.0,
                 watch: Iterable[str] | None = None) -> Any:
        """Poll `probe()` until it returns a truthy value; fail early if a watched service dies."""
        deadline = time.monotonic() + timeout
        while True:
            found = probe()
            if found:
                return found
            self.check_alive(watch)
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}; logs in {self.log_dir}")
            time.sleep(interval)

    def log_contains(self, name: str, needle: str) -> bool:
        try:
            return needle in self.services[name].log_path.read_text(errors="replace")
        except OSError:
            return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- HTTP


def http_json(method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 10) -> Any:
    """One JSON request; returns the decoded body (raises urllib.error.HTTPError on 4xx/5xx)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        payload = response.read()
    return json.loads(payload) if payload else None


def health(base_url: str) -> dict[str, Any] | None:
    """The api-server's /api/v2/monitor/health document, or None while it does not answer."""
    try:
        return http_json("GET", f"{base_url}/api/v2/monitor/health", timeout=3)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def all_healthy(document: Mapping[str, Any] | None, components: Iterable[str]) -> bool:
    return bool(document) and all((document.get(c) or {}).get("status") == "healthy" for c in components)
