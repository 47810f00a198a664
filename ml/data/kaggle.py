"""Kaggle downloads, with failures turned into SourceErrors a person can act on.

The key never appears in a message or log line. ``kaggle/__init__.py`` authenticates at
import, so the package is imported only inside `download`, after the credentials are in the
environment; the API object comes from `api_factory`, which tests replace with a fake.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ml.data.extract import log_transfer
from ml.errors import SourceError

log = logging.getLogger(__name__)

_SLUG = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REF = re.compile(rf"^(competitions/{_SLUG}|datasets/{_SLUG}/{_SLUG})$")
PRESTAGE_HINT = (
    "download the archive where there is network (kaggle competitions download -c <slug>) and "
    "point data.source at the .zip or at an s3:// copy of it"
)


def _default_api_factory() -> Any:
    from kaggle.api.kaggle_api_extended import KaggleApi

    return KaggleApi()


# Replaced in tests by a factory returning a fake; the real one imports kaggle lazily.
api_factory: Callable[[], Any] = _default_api_factory


def parse_kaggle_ref(ref: str) -> str:
    """Validate ``competitions/<slug>`` or ``datasets/<owner>/<slug>``; returns it stripped."""
    ref = ref.strip().strip("/")
    if not _REF.match(ref):
        raise SourceError(
            f"Kaggle source {ref!r} must be kaggle:competitions/<slug> or kaggle:datasets/<owner>/<slug>"
        )
    return ref


def _have_stored_credentials() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    if os.environ.get("KAGGLE_API_TOKEN"):
        return True
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle")
    return (config_dir / "kaggle.json").is_file() or (config_dir / "access_token").is_file()


@contextmanager
def _credentials_in_env(credentials: tuple[str, str] | None) -> Iterator[None]:
    """Put the credentials in the environment for the Kaggle client, then restore it."""
    if credentials is None:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("KAGGLE_USERNAME", "KAGGLE_KEY")}
    os.environ["KAGGLE_USERNAME"], os.environ["KAGGLE_KEY"] = credentials
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def _status_code(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return int(code) if isinstance(code, int) else None


def _is_network_error(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    try:
        import requests
    except ImportError:  # pragma: no cover - kaggle depends on requests
        return False
    return isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout)


def _translate(exc: BaseException, ref: str, secret: str | None) -> SourceError:
    kind, _, slug = ref.partition("/")
    code = _status_code(exc)
    if code == 403 and kind == "competitions":
        return SourceError(
            f"Kaggle refused {ref} (HTTP 403): accept the rules on "
            f"https://www.kaggle.com/competitions/{slug}/rules with this account, then retry"
        )
    if code in (401, 403):
        return SourceError(
            f"Kaggle refused the credentials for {ref} (HTTP {code}): check the username and key"
        )
    if code == 404:
        return SourceError(f"Kaggle has no {kind[:-1]} {slug!r} (HTTP 404)")
    if code is not None:
        return SourceError(f"Kaggle download of {ref} failed with HTTP {code}")
    if _is_network_error(exc):
        return SourceError(f"network unreachable: cannot download {ref} from Kaggle; {PRESTAGE_HINT}")
    return SourceError(f"Kaggle download of {ref} failed: {_scrub(f'{type(exc).__name__}: {exc}', secret)}")


def download(ref: str, dest: Path, *, credentials: tuple[str, str] | None = None) -> list[Path]:
    """Download a competition's or dataset's files (as Kaggle serves them, usually one zip) into `dest`.

    Args:
        ref: ``competitions/<slug>`` or ``datasets/<owner>/<slug>``.
        dest: Folder created with the files; written via a temporary sibling, so a failed
            download leaves nothing behind.
        credentials: (username, key); None uses KAGGLE_USERNAME/KAGGLE_KEY or ~/.kaggle/kaggle.json.

    Returns:
        The downloaded files.
    """
    ref = parse_kaggle_ref(ref)
    secret = credentials[1] if credentials else os.environ.get("KAGGLE_KEY")
    if credentials is None and not _have_stored_credentials():
        raise SourceError(
            f"no Kaggle credentials to download {ref}: set KAGGLE_USERNAME and KAGGLE_KEY (or a "
            "'kaggle' Airflow connection), or place kaggle.json in ~/.kaggle"
        )
    dest = Path(dest)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    started = time.monotonic()
    try:
        with _credentials_in_env(credentials):
            try:
                api = api_factory()
                api.authenticate()
            except SystemExit:  # the client exits when it finds no credentials
                raise SourceError(f"Kaggle authentication failed for {ref}: no usable credentials") from None
            except Exception as exc:  # noqa: BLE001 - the client raises many types; all become SourceError
                raise _translate(exc, ref, secret) from None
            kind, _, name = ref.partition("/")
            try:
                if kind == "competitions":
                    api.competition_download_files(name, path=str(tmp), quiet=True)
                else:
                    api.dataset_download_files(name, path=str(tmp), quiet=True, unzip=False)
            except SourceError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise _translate(exc, ref, secret) from None
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        if not files:
            raise SourceError(f"Kaggle returned no files for {ref}")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out = [dest / p.relative_to(tmp) for p in files]
    n_bytes = sum(p.stat().st_size for p in out)
    log_transfer(log, "downloaded", len(out), "file(s)", n_bytes, f"of kaggle:{ref}", started)
    return out
