"""Command line of the embedded SeaweedFS: start a detached server, ask after it, stop it.

::

    python -m ml.registry.seaweed start  --dir DIR [--s3-port N]   # detached; prints the endpoint
    python -m ml.registry.seaweed status --dir DIR                  # exit 1 when not running
    python -m ml.registry.seaweed stop   --dir DIR
    python -m ml.registry.seaweed env    --dir DIR                  # shell exports for the store

(``python -m ml.registry.seaweed_cli`` is the same.) The server's state, credentials included,
stays in ``DIR/state.json`` (mode 600); only ``env`` prints the credentials, as shell exports
for the caller's own environment.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from ml.errors import StorageError
from ml.registry.seaweed import STATE_FILE, SeaweedServer


def _adopted(data_dir: str) -> SeaweedServer | None:
    """The server recorded in `data_dir`, or None (after saying why) when there is no state file."""
    try:
        return SeaweedServer.from_state(data_dir)
    except StorageError as exc:
        print(f"not running: {exc}")
        return None


def _cmd_start(args: argparse.Namespace) -> int:
    if (Path(args.dir) / STATE_FILE).exists():
        existing = SeaweedServer.from_state(args.dir)
        if existing.is_running():
            print(f"already running: pid {existing.pid}, S3 endpoint {existing.endpoint_url}")
            return 0
    server = SeaweedServer(args.dir, s3_port=args.s3_port)
    server.start(timeout=args.timeout, detach=True)
    print(
        f"SeaweedFS S3 endpoint {server.endpoint_url} (pid {server.pid}, ready in "
        f"{server.startup_seconds:.1f} s); credentials in {server.state_path}"
    )
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    server = _adopted(args.dir)
    if server is None:
        return 0  # stopping what is not running is done, not an error (`make down` twice)
    pid, running = server.pid, server.is_running()
    server.stop()
    print(f"stopped SeaweedFS pid {pid}" if running else f"pid {pid} was not running; state file removed")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    server = _adopted(args.dir)
    if server is None:
        return 1
    if server.is_running():
        print(f"running: pid {server.pid}, S3 endpoint {server.endpoint_url}")
        return 0
    print(f"not running (stale state file {server.state_path}, pid {server.pid})")
    return 1


def _cmd_env(args: argparse.Namespace) -> int:
    server = SeaweedServer.from_state(args.dir)
    for key, value in server.env().items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "start": _cmd_start,
    "stop": _cmd_stop,
    "status": _cmd_status,
    "env": _cmd_env,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ml.registry.seaweed`` (and ``python -m ml.registry.seaweed_cli``)."""
    parser = argparse.ArgumentParser(
        prog="python -m ml.registry.seaweed", description="Run the embedded SeaweedFS object store on loopback."
    )
    parser.add_argument("command", choices=tuple(COMMANDS))
    parser.add_argument("--dir", required=True, help="data directory (holds state.json and weed.log)")
    parser.add_argument("--s3-port", type=int, default=None, help="S3 port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for readiness")
    args = parser.parse_args(argv)
    # A command-line program configures its own logging (the library never does).
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
