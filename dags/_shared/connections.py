"""How the DAGs get credentials: Airflow connections first, the environment as a fallback.

- `ml_object_store` (type aws): login = access key id, password = secret access key,
  extra `{"endpoint_url": "http://...", "region_name": "..."}`; absent -> `AWS_*` environment
  variables and `ML_S3_ENDPOINT_URL`.
- `kaggle_default`: login = Kaggle username, password = API key; absent -> `KAGGLE_USERNAME`/`KAGGLE_KEY`.

Secrets are handed to the clients directly, never logged or returned through XCom.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ml.config import PipelineConfig
    from ml.registry.store import ObjectStore

STORE_CONN_ID = "ml_object_store"
KAGGLE_CONN_ID = "kaggle_default"


def _connection(conn_id: str):
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None


def object_store(config: PipelineConfig) -> ObjectStore:
    """The pipeline's object store, authenticated from the `ml_object_store` connection (else the environment)."""
    from ml.registry.store import store_from_credentials

    conn = _connection(STORE_CONN_ID)
    if conn is None:
        return store_from_credentials(config.storage)
    return store_from_credentials(config.storage, login=conn.login, password=conn.password, extra=conn.extra_dejson)


def kaggle_credentials() -> tuple[str, str] | None:
    """(username, key) from the `kaggle_default` connection, or None to use the environment."""
    conn = _connection(KAGGLE_CONN_ID)
    if conn is None or not (conn.login and conn.password):
        return None
    return conn.login, conn.password
