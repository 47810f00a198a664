"""Training: settings, input pipeline, callbacks, fit, fine-tune, bottleneck cache, prediction, hardware.

``settings`` resolves a candidate's settings once (`CandidateSettings`); ``data`` holds its rows and
class weights; ``callbacks`` the Keras callbacks of every fit; ``fit`` and ``finetune`` train and
publish a candidate folder; ``resources`` measures peak memory. Submodules import TensorFlow/Keras
inside their functions, so importing this package is cheap.
"""

from __future__ import annotations
