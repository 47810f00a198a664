"""What downstream consumers import: load the production model and predict.

See `ml.serving.predictor` (`load_production`, `load_version`, `load_local`, `ModelClient`).
"""

from __future__ import annotations
