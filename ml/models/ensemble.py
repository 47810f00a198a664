"""One Keras model that averages the probabilities of several trained candidates.

Each member keeps its own preprocessing layer inside it, so the ensemble takes what every model of
this project takes: RGB float32 pixels in [0, 255], at the members' (shared) input size. No Lambda
layers: the model loads with ``safe_mode=True`` like any other candidate.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ml.errors import DataError

if TYPE_CHECKING:
    import keras


def build_ensemble(members: Sequence[keras.Model], weights: Sequence[float], *, names: Sequence[str],
                   name: str = "ensemble") -> keras.Model:
    """The weighted mean of `members`' outputs as one functional model.

    Args:
        members: Trained models, each (N, S_i, S_i, 3) -> (N, K) probabilities, K the same for all.
        weights: One non-negative weight per member, summing to 1.
        names: The members' candidate names (the sub-models are named after them).
        name: The ensemble model's name.

    Raises:
        DataError: the members disagree on the number of classes, or the lists differ in length.
    """
    import keras

    from ml.models.layers import ProbabilityAverage

    if not len(members) == len(weights) == len(names):
        raise DataError(f"{len(members)} members, {len(weights)} weights and {len(names)} names: one each")
    widths = {str(n): int(m.output_shape[-1]) for m, n in zip(members, names, strict=True)}
    if len(set(widths.values())) != 1:
        raise DataError(f"ensemble members predict different numbers of classes: {widths}")
    sizes = {str(n): int(m.input_shape[1]) for m, n in zip(members, names, strict=True)}
    if len(set(sizes.values())) != 1:
        # A Resizing layer in front of a member exported to a SavedModel that disagreed with model.keras
        # on the golden images (max probability difference 0.29), so members must share their input size.
        raise DataError(f"ensemble members were trained at different image sizes {sizes}: train them at one "
                        "size (train.image_size) to ensemble them")
    size = next(iter(sizes.values()))
    inputs = keras.Input((size, size, 3), name="image")
    outputs = []
    for index, (member, member_name) in enumerate(zip(members, names, strict=True)):
        safe = re.sub(r"[^A-Za-z0-9_]", "_", str(member_name))
        # A fresh wrapper over the member's own graph: unique layer names inside the ensemble.
        wrapped = keras.Model(member.inputs[0], member.outputs[0], name=f"member{index}_{safe}")
        outputs.append(wrapped(inputs))
    average = ProbabilityAverage(member_weights=list(weights), name="average")(outputs)
    return keras.Model(inputs, average, name=name)
