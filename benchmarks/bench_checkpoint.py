"""7. The price of resumable training: an epoch checkpoint to the store after every epoch.

The demo's training at its own size (750 generated 64 px images, `scratch_small` at 96 px, batch 32)
trained twice with the same seed, alternating: with a checkpoint to a private SeaweedFS on loopback
after every epoch (`train.checkpoint_every_epochs: 1`, the default) and without. The ratio is the
median seconds per epoch without / with (epochs 2+; epoch 1 traces the tf.function). Also the
seconds and bytes of one save for the largest state the demo writes: fine-tuning MobileNetV2
(alpha 1.0, 96 px) with its Adam moments.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import Result, Settings, fmt, generated_dataset, log

MODEL = "bench"


class _EpochTimer:
    """Seconds of every epoch: from one on_epoch_begin to the next (or to on_train_end), so they
    include every callback's on_epoch_end -- the checkpoint's save among them."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    @property
    def seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]

    def callback(self) -> Any:
        import keras

        marks = self.marks

        class Timer(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                marks.append(time.perf_counter())

            def on_train_end(self, logs: Any = None) -> None:
                marks.append(time.perf_counter())

        return Timer()


def _train(dataset: Path, work: Path, epochs: int, seed: int, checkpoints: Any) -> tuple[list[float], list[dict]]:
    """Epoch seconds and checkpoint saves of one `train_candidate` of scratch_small."""
    import ml.training.fit as fit
    from ml.config import TrainConfig

    timer = _EpochTimer()
    saves: list[dict] = []
    original = fit.make_callbacks

    def timed(*args: Any, **kwargs: Any) -> list[Any]:
        callbacks = original(*args, **kwargs)
        found = [c for c in callbacks if type(c).__name__ == "EpochCheckpoint"]
        if found:
            saves.extend([found[0].saves])  # filled in place while training
        return [timer.callback(), *callbacks]

    config = TrainConfig(candidates=("scratch_small",), epochs=epochs, image_size=96, batch_size=32, seed=seed,
                         early_stopping_patience=1000)
    fit.make_callbacks = timed
    try:
        fit.train_candidate(dataset, "scratch_small", work / f"out-{uuid.uuid4().hex[:6]}", config,
                            cache_root=work / "cache", checkpoints=checkpoints)
    finally:
        fit.make_callbacks = original
    return timer.seconds, (saves[0] if saves else [])


def _finetune_state_save(store: Any) -> dict[str, float]:
    """One save of a fine-tuned MobileNetV2's state (weights + Adam moments of the unfrozen top)."""
    from ml.models.registry import get_architecture
    from ml.models.transfer import build_transfer
    from ml.training.checkpoints import CheckpointStore, pack_state
    from ml.training.finetune import unfreeze_from_boundary
    from ml.training.fit import compile_model

    model = build_transfer("mobilenet_v2", 5, 96, weights=None)
    unfreeze_from_boundary(model, get_architecture("mobilenet_v2"))
    compile_model(model, 1e-4, 0.0)
    model.optimizer.build(model.trainable_variables)
    target = CheckpointStore.for_candidate(store, MODEL, "bench", "finetune_mobilenet_v2")
    started = time.perf_counter()
    payload = pack_state({"model": [v.numpy() for v in model.variables],
                          "optimizer": [v.numpy() for v in model.optimizer.variables],
                          "best": model.get_weights()}, {"counts": {}})
    target.save(1, payload)
    return {"seconds": time.perf_counter() - started, "bytes": len(payload), "params": model.count_params()}


def run(settings: Settings) -> Result:
    from ml.registry.seaweed import SeaweedServer
    from ml.registry.store import ObjectStore
    from ml.training.checkpoints import CheckpointStore

    n, epochs, reps = (120, 3, 1) if settings.quick else (750, 5, 2)
    dataset = generated_dataset(n, settings.seed, size=64)
    server = SeaweedServer(Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=settings.work)))
    server.start(timeout=90)
    try:
        store = ObjectStore(f"bench-{uuid.uuid4().hex[:8]}", endpoint_url=server.endpoint_url,
                            access_key=server.access_key, secret_key=server.secret_key)
        store.ensure_bucket()
        plain: list[float] = []
        with_ckpt: list[float] = []
        saves: list[dict] = []
        for rep in range(reps):  # alternate, so load from other users hits both alike
            seconds, _ = _train(dataset, settings.work, epochs, settings.seed, None)
            plain += seconds[1:]
            target = CheckpointStore.for_candidate(store, MODEL, f"bench-{rep}", "scratch_small")
            seconds, done = _train(dataset, settings.work, epochs, settings.seed, target)
            with_ckpt += seconds[1:]
            saves += done[1:]
        finetune = _finetune_state_save(store)
    finally:
        server.stop()
    d = {"images": n, "epochs": epochs, "repetitions": reps, "epoch_s_plain": plain, "epoch_s_checkpoint": with_ckpt,
         "save_s": [s["seconds"] for s in saves], "save_bytes": saves[0]["bytes"] if saves else None,
         "finetune_mobilenet_v2": finetune}
    log.info("checkpoint: %s", d)
    median_plain, median_ckpt = statistics.median(plain), statistics.median(with_ckpt)
    save_s = statistics.median(d["save_s"]) if d["save_s"] else float("nan")
    return Result(
        name="checkpoint",
        title=f"scratch_small epoch on {n} images, with a checkpoint to the store after it",
        baseline=fmt(median_plain, "s/epoch", 2) + " no checkpoint", project=fmt(median_ckpt, "s/epoch", 2),
        ratio=median_plain / median_ckpt,
        ratio_meaning="s/epoch without / with the checkpoint (< 1: its price)",
        details=d,
        notes=[f"one save: {d['save_bytes'] / 1e6 if d['save_bytes'] else 0:.2f} MB in {save_s:.3f} s (median); "
               f"fine-tuning MobileNetV2 96 px ({finetune['params']:,} params): {finetune['bytes'] / 1e6:.1f} MB "
               f"in {finetune['seconds']:.2f} s"],
    )
