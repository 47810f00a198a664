"""
### Production model smoke test (an example consumer)

Runs whenever `image_classifier_retraining` promotes a new model (it is scheduled on the
production-model Asset). It loads the model the way a service would, through `ml.serving`
(download once, verify sha256, Keras `safe_mode`), predicts a few held-out images of the
dataset the model was trained on, and fails loudly if the model does not load or predicts
garbage (invalid probabilities, or accuracy not above chance).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Asset, dag, task

from ml.config import PRODUCTION_ASSET_NAME, PRODUCTION_ASSET_URI

PRODUCTION_MODEL = Asset(name=PRODUCTION_ASSET_NAME, uri=PRODUCTION_ASSET_URI)


@dag(
    dag_id=Path(__file__).stem,
    doc_md=__doc__,
    schedule=[PRODUCTION_MODEL],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=15), "execution_timeout": timedelta(minutes=20)},
    tags=["ml", "consumer"],
)
def production_model_smoke_test():
    @task
    def smoke() -> dict:
        """Load production through ml.serving and predict held-out images."""
        from _shared.connections import object_store

        from ml.config import PipelineConfig
        from ml.data.snapshot import local_dataset
        from ml.registry.versions import read_pointer
        from ml.serving.predictor import load_production
        from ml.serving.smoke import smoke_test

        config = PipelineConfig.load()
        store = object_store(config)
        pointer, _ = read_pointer(store, config.storage.model_name)
        predictor = load_production(store, config.storage.model_name, cache_dir=config.work_dir / "models")
        # This worker may never have seen the dataset: materialised from the store by its hash.
        return smoke_test(predictor, local_dataset(config, store, pointer["dataset_hash"]))

    smoke()


production_model_smoke_test()
