"""A synthetic, offline dataset of textured shapes, in Kaggle's or a folder-per-class layout.

Each class is a (texture, shape) pair such as ``striped_circle``. Position, scale, rotation,
colours, background clutter, noise and blur vary per image, so colour and location say nothing
about the class: a small CNN has to learn shape *and* texture, which it can in a few epochs,
while a broken model stays near chance. The same seed always gives the same bytes.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ml.errors import ConfigError

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
TEXTURES = ("striped", "dotted", "checkered", "solid")
# Textures no sample class uses: the pretext task (`pretext_images`) that pretrains a backbone for
# an offline demo is drawn with these, so it never shares a class or a texture with the sample.
PRETEXT_TEXTURES = ("wavy", "grid")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)
LAYOUTS = ("kaggle", "folders")
JPEG_QUALITY = 90
DEFAULT_CLASSES = 4


def class_names(classes: int) -> list[str]:
    """The first `classes` class names, ordered so that small counts differ in shape and texture."""
    return _generated_names(classes)


def _generated_names(classes: int) -> list[str]:
    if not 2 <= classes <= MAX_CLASSES:
        raise ConfigError(f"classes must be in [2, {MAX_CLASSES}], got {classes}")
    names = []
    for i in range(classes):
        shape = i % len(SHAPES)
        # Shift the texture with each pass over the shapes so every (shape, texture) pair is unique.
        texture = (shape + i // len(SHAPES)) % len(TEXTURES)
        names.append(f"{TEXTURES[texture]}_{SHAPES[shape]}")
    return names


def make_sample_dataset(
    dest: Path,
    *,
    classes: int | None = None,
    per_class: int = 60,
    size: int = 96,
    seed: int = 0,
    layout: str = "kaggle",
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write a synthetic JPEG dataset under `dest`.

    Args:
        dest: Folder to write into (created; existing files with the same names are replaced).
        classes: Number of classes, 2 to 24 (None: 4, or as many as `class_names`).
        per_class: Labelled images per class.
        size: Image side in pixels (>= 16).
        seed: Everything (ids, pixels) is a function of the seed.
        layout: "kaggle" (labels.csv + train/<id>.jpg + test/ + sample_submission.csv) or
            "folders" (<class>/<n>.jpg).
        class_names: Labels to write instead of the generated ``striped_circle``-style names, one
            per class (their number is the number of classes; `classes`, if given, must agree).
            Images are drawn exactly as for the generated names; only the labels differ. Any text
            is allowed in the Kaggle layout (it is CSV-quoted), e.g. ``<script>``, ``a/b`` or
            ``perro español``, to test what the product does with hostile labels; the folders layout
            needs names usable as one folder name.

    Returns:
        {"dest", "layout", "classes", "n_images"} where n_images counts labelled images.
    """
    import cv2

    if class_names is not None:
        classes = _check_custom_names(class_names, classes, layout)
    elif classes is None:
        classes = DEFAULT_CLASSES
    if classes < 2:
        raise ConfigError(f"classes must be >= 2, got {classes}")
    if per_class < 1:
        raise ConfigError(f"per_class must be >= 1, got {per_class}")
    if size < 16:
        raise ConfigError(f"size must be >= 16 pixels, got {size}")
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    # The generated names say which shape and texture each class is drawn with.
    drawn = _generated_names(classes)
    names = list(class_names) if class_names is not None else drawn
    dest = Path(dest)
    rng = np.random.default_rng(seed)
    # Labels in a shuffled but seed-determined order, like a real export.
    labels = np.repeat(np.arange(classes), per_class)
    rng.shuffle(labels)
    encode = [int(cv2.IMWRITE_JPEG_QUALITY), JPEG_QUALITY]

    def write(path: Path, label: int) -> None:
        hue = 180.0 * label / classes
        image = render(rng, label % len(SHAPES), TEXTURES.index(drawn[label].split("_")[0]), size, hue)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), encode)
        if not ok:  # pragma: no cover - cv2 always encodes uint8 RGB
            raise RuntimeError(f"cv2 could not encode {path}")
        path.write_bytes(buf.tobytes())

    if layout == "folders":
        for name in names:
            (dest / name).mkdir(parents=True, exist_ok=True)
        counters = [0] * classes
        for label in labels:
            write(dest / names[label] / f"{counters[label]:04d}.jpg", int(label))
            counters[label] += 1
    else:
        (dest / "train").mkdir(parents=True, exist_ok=True)
        (dest / "test").mkdir(parents=True, exist_ok=True)
        ids = _unique_hex_ids(rng, len(labels))
        with (dest / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "breed"])
            for image_id, label in zip(ids, labels, strict=True):
                writer.writerow([image_id, names[label]])
                write(dest / "train" / f"{image_id}.jpg", int(label))
        # Kaggle's unlabelled test set: about 10% of the labelled count, at least 2.
        n_test = max(2, len(labels) // 10)
        test_ids = _unique_hex_ids(rng, n_test, exclude=set(ids))
        with (dest / "sample_submission.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", *names])
            for image_id in test_ids:
                write(dest / "test" / f"{image_id}.jpg", int(rng.integers(classes)))
                writer.writerow([image_id, *([f"{1 / classes:.6f}"] * classes)])
    log.info(
        "sample dataset: %d images of %d classes (%d px, %s layout) in %s",
        len(labels),
        classes,
        size,
        layout,
        dest,
    )
    return {"dest": str(dest), "layout": layout, "classes": names, "n_images": int(len(labels))}


def _check_custom_names(names: Sequence[str], classes: int | None, layout: str) -> int:
    """The number of classes `names` make; ConfigError naming the offending name otherwise."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"class_names must be a list of strings, got {names!r}")
    names = list(names)
    if classes is not None and classes != len(names):
        raise ConfigError(f"class_names has {len(names)} names but classes={classes}")
    if not 2 <= len(names) <= MAX_CLASSES:
        raise ConfigError(f"class_names must hold 2 to {MAX_CLASSES} names, got {len(names)}")
    for name in names:
        # layouts.py strips label cells: a padded or empty name would not come back as written.
        if not name or name != name.strip():
            raise ConfigError(f"class name {name!r} is empty or has leading/trailing whitespace")
        if layout == "folders" and (name in (".", "..") or any(c in name for c in "/\\\0")):
            raise ConfigError(f"class name {name!r} cannot be a folder name (layout 'folders'); "
                              "use layout 'kaggle'")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"class_names repeats {duplicates}")
    return len(names)


def _unique_hex_ids(rng: np.random.Generator, n: int, exclude: set[str] | None = None) -> list[str]:
    seen = set(exclude or ())
    out: list[str] = []
    while len(out) < n:
        image_id = rng.bytes(16).hex()  # 32 hex digits, like Kaggle's ids
        if image_id not in seen:
            seen.add(image_id)
            out.append(image_id)
    return out


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _hued(rng: np.random.Generator, hue: float) -> np.ndarray:
    import cv2

    h = (hue + rng.normal(0, 10)) % 180  # +-10 of 180 (~20 degrees): neighbours overlap a little
    hsv = np.array([[[h, rng.uniform(140, 255), rng.uniform(140, 255)]]], dtype=np.float32)
    hsv_u8 = np.clip(hsv, 0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv_u8, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _contrasting(rng: np.random.Generator, other: np.ndarray, min_distance: float = 120.0) -> np.ndarray:
    for _ in range(20):
        c = _colour(rng)
        if np.linalg.norm(c - other) >= min_distance:
            return c
    return 255.0 - other


def _shape_polygons(shape: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Unit-size outline(s) of a shape centred on 0: (filled polygons, holes)."""
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], axis=1)
    name = SHAPES[shape]
    if name == "circle":
        return [circle], []
    if name == "ring":
        return [circle], [circle * rng.uniform(0.45, 0.6)]
    if name == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.85], []
    if name == "triangle":
        a = np.array([-90, 30, 150]) * math.pi / 180
        return [np.stack([np.cos(a), np.sin(a)], axis=1)], []
    if name == "star":
        a = np.arange(10) * math.pi / 5 - math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return [np.stack([r * np.cos(a), r * np.sin(a)], axis=1)], []
    # cross: a plus sign with arms a third of the width
    w = 0.33
    pts = [
        [-w, -1],
        [w, -1],
        [w, -w],
        [1, -w],
        [1, w],
        [w, w],
        [w, 1],
        [-w, 1],
        [-w, w],
        [-1, w],
        [-1, -w],
        [-w, -w],
    ]
    return [np.array(pts, dtype=np.float64)], []


def _texture(texture: int | str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A float mask in [0, 1] with the texture pattern (1 = foreground colour)."""
    name = TEXTURES[texture] if isinstance(texture, int) else texture
    if name == "solid":
        return np.ones((size, size), dtype=np.float32)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    u = x * math.cos(theta) + y * math.sin(theta)
    v = -x * math.sin(theta) + y * math.cos(theta)
    period = rng.uniform(0.10, 0.16) * size
    if name == "striped":
        return ((u // (period / 2)) % 2).astype(np.float32)
    if name == "checkered":
        return (((u // (period / 2)) + (v // (period / 2))) % 2).astype(np.float32)
    if name == "wavy":  # stripes bent by a sine across them
        return (((u + 0.35 * period * np.sin(2 * math.pi * v / period)) // (period / 2)) % 2).astype(np.float32)
    if name == "grid":  # thin lines on both axes
        return (((u % period) < period * 0.25) | ((v % period) < period * 0.25)).astype(np.float32)
    # dotted: discs on a rotated lattice
    du = (u % period) - period / 2
    dv = (v % period) - period / 2
    return (du * du + dv * dv <= (period * 0.3) ** 2).astype(np.float32)


def pretext_images(per_class: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A labelled task unlike the sample's, in memory: which shape, drawn in one of `PRETEXT_TEXTURES`.

    Its 6 classes (``pretext_circle``, ...) are shapes whatever their texture, without a class hue;
    no sample class or texture appears. It exists to pretrain a backbone offline (`ml.models.pretext`).
    Shapes rather than shape x texture pairs: a from-scratch MobileNet learns 6 shapes within a
    few epochs on 2 cores, while 12 shape-texture classes stayed near chance for 10 epochs.

    Returns:
        (uint8 images ``(n, size, size, 3)``, int labels ``(n,)``, class names).
    """
    if per_class < 1 or size < 16:
        raise ConfigError(f"pretext_images needs per_class >= 1 and size >= 16, got {per_class} and {size}")
    names = [f"pretext_{shape}" for shape in SHAPES]
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(names)), per_class)
    rng.shuffle(labels)
    textures = rng.integers(0, len(PRETEXT_TEXTURES), size=len(labels))
    images = np.stack([
        render(rng, int(label), PRETEXT_TEXTURES[int(t)], size) for label, t in zip(labels, textures, strict=True)
    ])
    return images, labels.astype(np.int64), names


def render(
    rng: np.random.Generator, shape: int, texture: int | str, size: int, hue: float | None = None
) -> np.ndarray:
    """One RGB uint8 image of `shape` filled with `texture` (a `TEXTURES` index or any texture name)
    on a cluttered background.

    `hue` (OpenCV's 0-180 scale) biases the shape's main colour towards a class hue: a cue a model
    picks up within a few epochs (like fur colour for a breed), not a giveaway (it is jittered
    and neighbouring classes overlap), so shape and texture still matter.
    """
    import cv2

    # Background: a smooth random colour field plus thin clutter lines and small blobs.
    # A random base colour with +-60 of smooth variation: busy, but it rarely swallows the shape.
    base = rng.uniform(40, 215, size=(1, 1, 3))
    coarse = np.clip(base + rng.uniform(-60, 60, size=(4, 4, 3)), 0, 255).astype(np.float32)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(0, 4))):
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        p2 = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.line(image, p1, p2, tuple(float(c) for c in _colour(rng)), 1, lineType=cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 3))):
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.circle(
            image,
            centre,
            max(1, int(size * rng.uniform(0.02, 0.05))),
            tuple(float(c) for c in _colour(rng)),
            -1,
            lineType=cv2.LINE_AA,
        )

    # The shape: random scale, rotation and position, fully inside the frame.
    radius = size * rng.uniform(0.30, 0.44)
    angle = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centre = rng.uniform(radius + 1, size - radius - 1, size=2)
    polys, holes = _shape_polygons(shape, rng)
    mask = np.zeros((size, size), dtype=np.uint8)
    scale = 16  # cv2 sub-pixel shift: 4 bits

    def to_px(poly: np.ndarray) -> np.ndarray:
        return np.round((poly @ rot.T * radius + centre) * scale).astype(np.int32)

    cv2.fillPoly(mask, [to_px(p) for p in polys], 255, lineType=cv2.LINE_AA, shift=4)
    if holes:
        cv2.fillPoly(mask, [to_px(p) for p in holes], 0, lineType=cv2.LINE_AA, shift=4)
    alpha = (mask.astype(np.float32) / 255.0)[..., None]

    fg = _colour(rng) if hue is None else _hued(rng, hue)
    bg_mean = image.reshape(-1, 3).mean(axis=0)
    if hue is None and np.linalg.norm(fg - bg_mean) < 100:
        fg = _contrasting(rng, bg_mean, 100.0)
    second = _contrasting(rng, fg)
    pattern = _texture(texture, size, rng)[..., None]
    fill = pattern * fg + (1.0 - pattern) * second
    image = alpha * fill + (1.0 - alpha) * image

    # Camera-like degradations: sensor noise and, sometimes, defocus blur.
    image += rng.normal(0, rng.uniform(2, 7), size=image.shape).astype(np.float32)
    if rng.random() < 0.25:
        image = cv2.GaussianBlur(image, (3, 3), rng.uniform(0.4, 1.0))
    return np.clip(image, 0, 255).astype(np.uint8)
