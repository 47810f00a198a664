"""Fault-injection fixtures: private SeaweedFS servers the tests may kill, a fault proxy, tiny runs.

Every test here injects its fault for real (SIGKILL of a process, a stopped store, bytes changed
on disk, a full filesystem, rejected credentials) and checks the protection that should contain
it. Servers are the tests' own, never the session's shared `seaweed`, because they get killed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = "image-classifier"
PYTHON = sys.executable


# --------------------------------------------------------------------------- config and store


def tiny_config(work_dir: Path, bucket: str, endpoint: str | None, *, train: dict[str, Any] | None = None,
                gate: dict[str, Any] | None = None, source: str | Path | None = None) -> Any:
    """A pipeline config small enough for a test: scratch_tiny, 32 px, 2 epochs, no fine-tuning.

    The gate forces promotion by default so that a promotion happens whatever the tiny model's
    accuracy; tests that need a strict gate pass their own `gate` settings.
    """
    from ml.config import PipelineConfig

    raw = {
        "work_dir": str(work_dir),
        "storage": {"bucket": bucket, "model_name": MODEL, "endpoint_url": endpoint},
        "data": {"source": str(source or ""), "min_images_per_class": 5},
        "train": {"candidates": ["scratch_tiny"], "epochs": 2, "image_size": 32, "batch_size": 32,
                  "finetune_top_k": 0, **(train or {})},
        "gate": {"force": True, "force_promote": True, **(gate or {})},
    }
    return PipelineConfig.from_dict(raw)


def config_json(config: Any) -> str:
    return json.dumps(config.to_dict())


def new_bucket_name(prefix: str = "faults") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def store_for(server: Any, bucket: str, *, endpoint: str | None = None, access_key: str | None = None,
              secret_key: str | None = None, create: bool = True, **kwargs: Any) -> Any:
    """An ObjectStore on `server` (or on `endpoint`, e.g. a fault proxy in front of it)."""
    from ml.registry.store import ObjectStore

    store = ObjectStore(bucket, endpoint_url=endpoint or server.endpoint_url,
                        access_key=access_key or server.access_key,
                        secret_key=secret_key or server.secret_key, **kwargs)
    if create:
        store.ensure_bucket()
    return store


def start_weed(data_dir: Path, **kwargs: Any) -> Any:
    from ml.errors import StorageError
    from ml.registry.seaweed import SeaweedServer, find_weed

    try:
        find_weed()
    except StorageError as exc:
        pytest.skip(f"SeaweedFS is not installed: {exc}")
    return SeaweedServer(data_dir, **kwargs).start(timeout=90)


def kill_weed(server: Any) -> None:
    """SIGKILL the store's whole process group (no shutdown at all) and reap it."""
    pid = server.pid
    assert pid is not None and server.is_running(), "the store is not running"
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server.is_running() and time.monotonic() < deadline:  # is_running() reaps the child
        time.sleep(0.02)
    assert not server.is_running(), f"weed pid {pid} survived SIGKILL"


@pytest.fixture
def own_seaweed(tmp_path: Path) -> Iterator[Any]:
    """A SeaweedFS of this test alone: it may be killed and restarted on the same ports."""
    server = start_weed(tmp_path / "weed")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def module_seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A SeaweedFS shared by one test module (never killed)."""
    server = start_weed(tmp_path_factory.mktemp("weed"))
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- data and runs


@pytest.fixture(scope="session")
def sample_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class sample in the Kaggle dog-breed layout (90 JPEGs of 40 px); read-only."""
    from ml.data.sample import make_sample_dataset

    dest = tmp_path_factory.mktemp("sample") / "dogs"
    make_sample_dataset(dest, classes=3, per_class=30, size=40, seed=5)
    return dest


def run_to_gate(config: Any, store: Any, run_id: str, *, validate: bool = False) -> dict[str, Any]:
    """ingest -> (validate) -> prepare -> train -> evaluate -> gate, in this process."""
    from ml import pipeline as P

    dataset = P.ingest_stage(config, store)
    quality = P.validate_stage(dataset, config, store, run_id) if validate else None
    P.prepare_stage(dataset, config)
    results = [P.train_stage(dataset, c, config, store, run_id)
               for c in config.train.candidates]
    evaluation = P.evaluate_stage(dataset, results, config, store, run_id)
    decision = P.gate_stage(dataset, evaluation, config, store, run_id)
    return {"dataset": dataset, "quality": quality, "evaluation": evaluation, "decision": decision,
            "results": results}


def seed_production(config: Any, store: Any, run_id: str, candidate: str, version: str) -> tuple[bytes, str]:
    """Publish a run's trained candidate as `version` and make it production (the first promotion).

    Returns production.json's (bytes, ETag).
    """
    from ml.registry.runs import local_run_dir
    from ml.registry.versions import promote, publish_version, read_pointer

    cand = local_run_dir(config, run_id) / candidate
    files = {name: cand / name for name in ("model.keras", "labels.json", "preprocessing.json")}
    labels = json.loads((cand / "labels.json").read_text())
    dataset_hash = json.loads((cand / "train_summary.json").read_text())["dataset_hash"]
    publish_version(store, config.storage.model_name, version, files,
                    {"candidate": candidate, "run_id": "seed", "metrics": {}, "labels": labels,
                     "dataset_hash": dataset_hash})
    _, etag = read_pointer(store, config.storage.model_name)
    promote(store, config.storage.model_name, version, expected_etag=etag, actor="test-seed", reason="seed")
    found = store.get_with_etag(f"{config.storage.model_name}/production.json")
    assert found is not None
    return found


def sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def assert_pointer_verifiable(store: Any, model_name: str = MODEL) -> dict[str, Any]:
    """production.json names a COMPLETE version whose stored model.keras has the pointer's sha256."""
    from ml.registry.versions import read_pointer, read_version, version_prefix

    pointer, _ = read_pointer(store, model_name)
    assert pointer is not None, "no production pointer"
    info = read_version(store, model_name, pointer["version"])  # raises unless COMPLETE
    model = store.get_bytes(version_prefix(model_name, pointer["version"]) + "model.keras")
    assert sha256_bytes(model) == pointer["sha256"] == info["sha256"]
    return pointer


# --------------------------------------------------------------------------- subprocesses


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ML_"))}
    env.update({"PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3", "AWS_EC2_METADATA_DISABLED": "true",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


# --------------------------------------------------------------------------- the fault proxy


class FaultProxy:
    """A TCP proxy in front of the store's S3 port that fires a fault at an exact request.

    Clients use `endpoint` instead of the store's own. `arm(marker, action, after_bytes)` runs
    `action` (e.g. SIGKILL the store) once, as soon as `after_bytes` bytes of the client's
    stream have followed `marker` (e.g. ``b"PUT /bucket/model/production.json"``, or a compiled
    bytes regex such as ``re.compile(rb"PUT /\S+/versions/\S+/model\.keras ")``); the
    triggering bytes are not forwarded and the connection is dropped. The fault itself is real
    (the store process dies); the proxy only makes its timing exact. With the store down, new
    connections are accepted and closed, as a dead endpoint behind a load balancer looks.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._marker: bytes | re.Pattern[bytes] | None = None
        self._after = 0
        self._action: Callable[[], None] | None = None
        self.fired = threading.Event()
        self.fired_at: float | None = None
        self.connections = 0
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(self, marker: bytes | re.Pattern[bytes], action: Callable[[], None], *, after_bytes: int = 0) -> None:
        with self._lock:
            self._marker, self._action, self._after = marker, action, after_bytes
            self.fired.clear()

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        seen, count, tail = False, 0, b""
        try:
            while chunk := client.recv(65536):
                with self._lock:
                    marker, action = self._marker, self._action
                    if marker is not None and action is not None and not self.fired.is_set():
                        if not seen:
                            window = tail + chunk
                            end = _marker_end(window, marker)
                            if end >= 0:
                                seen, count = True, len(window) - end
                            tail = window[-512:]  # a marker split across two reads is still found
                        else:
                            count += len(chunk)
                        if seen and count >= self._after:
                            self.fired_at = time.monotonic()
                            action()
                            self.fired.set()
                            return
                upstream.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _marker_end(window: bytes, marker: bytes | re.Pattern[bytes]) -> int:
    """Index just past the first match of `marker` in `window`, or -1."""
    if isinstance(marker, bytes):
        at = window.find(marker)
        return at + len(marker) if at >= 0 else -1
    match = marker.search(window)
    return match.end() if match else -1


@pytest.fixture
def fault_proxy(own_seaweed: Any) -> Iterator[FaultProxy]:
    proxy = FaultProxy(own_seaweed.ports["s3"])
    try:
        yield proxy
    finally:
        proxy.close()


# --------------------------------------------------------------------------- a real Airflow


def airflow_stack(root: Path, server: Any, bucket: str, pipeline_yaml: dict[str, Any], *,
                  endpoint_url: str | None = None, extra_env: dict[str, str] | None = None) -> Any:
    """An `airflow standalone` stack (scripts/airflow_stack.py) on free ports, its config file written.

    The caller starts and stops it; `pipeline_yaml` becomes the ML_CONFIG file of its tasks, and
    tasks reach the store at `endpoint_url` (e.g. a FaultProxy) or the server's own endpoint;
    `extra_env` adds to every airflow process's environment (e.g. ML_MAX_RUN_MINUTES).
    """
    import yaml

    from scripts.airflow_stack import AirflowStack, free_port

    root.mkdir(parents=True, exist_ok=True)
    config_file = root / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(pipeline_yaml))
    return AirflowStack(root, server, api_port=free_port(), bucket=bucket,
                        extra_env={"ML_CONFIG": str(config_file), **(extra_env or {})}, endpoint_url=endpoint_url)
