"""Image-classifier retraining library: data, models, training, evaluation, registry, serving.

Importable without Airflow; heavy dependencies (TensorFlow, Great Expectations, boto3) are
imported inside the functions that use them so `import ml` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"
