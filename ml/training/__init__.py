"""Training: input pipeline, fit, fine-tune, bottleneck cache, prediction, hardware setup.

Submodules import TensorFlow/Keras inside their functions, so importing this package is cheap.
"""

from __future__ import annotations
