"""A self-contained HTML model card for a published model version.

The card travels with the model (``versions/<version>/model_card.html``), so it embeds its
figures as base64 data URIs and uses no external assets. Every string that came from data
(class names, candidate names, sources, reasons) is escaped: labels come from users' files.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ml.evaluation.confusions import confused_pairs, confusion_section
from ml.evaluation.html import esc, html_page, num, pct
from ml.evaluation.leaderboard import leaderboard_html_table
from ml.evaluation.report import dataset_section, decision_section, quality_section
from ml.io import to_jsonable

log = logging.getLogger(__name__)

_IMAGE_TITLES = {"curves": "Learning curves", "confusion": "Confusion matrix (test split)",
                 "leaderboard": "Leaderboard"}
# Cards must stay small enough to open in a browser from the object store.
_MAX_EMBED_BYTES = 8 * 1024 * 1024
_N_WORST_CLASSES = 5


def _embed_png(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        log.warning("model card: cannot read image %s (%s); leaving it out", path, exc)
        return None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        log.warning("model card: %s is not a PNG; leaving it out", path)
        return None
    if len(data) > _MAX_EMBED_BYTES:
        log.warning("model card: %s is %d bytes, over the %d embedding limit; leaving it out",
                    path, len(data), _MAX_EMBED_BYTES)
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _image_size(lineage: Mapping[str, Any], preprocessing: Mapping[str, Any] | None) -> int | None:
    for source in (preprocessing or {}, lineage.get("preprocessing") or {}, lineage):
        if isinstance(source, Mapping) and isinstance(source.get("image_size"), int):
            return int(source["image_size"])
    return None


def render_model_card(
    *,
    model_name: str,
    version: str,
    candidate: str,
    metrics: Mapping[str, Any],
    labels: Sequence[str],
    dataset: Mapping[str, Any],
    quality: Mapping[str, Any] | None,
    leaderboard: Sequence[Mapping[str, Any]],
    decision: Mapping[str, Any] | None,
    lineage: Mapping[str, Any],
    images: Mapping[str, Path] | None,
    preprocessing: Mapping[str, Any] | None = None,
) -> str:
    """Render the model card as one self-contained HTML page.

    Args:
        model_name, version, candidate: what is being published.
        metrics: `evaluate_predictions` output for this model on the test split.
        labels: class names, index = output unit.
        dataset: ``dataset.json`` contents.
        quality: the data-quality result, or None.
        leaderboard: the run's ranked rows.
        decision: the gate's decision, or None.
        lineage: run id, dataset hash, code version, config, weights... (shown as given).
        images: {"curves"|"confusion"|"leaderboard"|...: PNG path}, embedded as data URIs.
        preprocessing: ``preprocessing.json`` contents; ``image_size`` is also looked up in
            ``lineage["preprocessing"]`` and ``lineage``.
    """
    n_test = metrics.get("n")
    n_classes = len(labels)
    size = _image_size(lineage, preprocessing)
    size_text = f"{size} x {size} pixels" if size else "the model's input size (see preprocessing.json)"
    title = f"Model card: {model_name} {version}"

    per_class = metrics.get("per_class") or {}
    by_recall = sorted(per_class.items(), key=lambda kv: (kv[1].get("recall", 0.0), str(kv[0])))
    worst = by_recall[:_N_WORST_CLASSES]
    confusions = metrics.get("confused_pairs")
    if confusions is None and metrics.get("confusion") and len(metrics["confusion"]) == n_classes:
        confusions = confused_pairs(metrics["confusion"], list(labels))  # metrics.json of an older release

    summary = (
        f"<p><strong>{esc(model_name)}</strong> version <code>{esc(version)}</code>, trained as candidate "
        f"<code>{esc(candidate)}</code>, classifies an image into one of {n_classes} classes. "
        f"On the held-out test split of {esc(n_test if n_test is not None else '?')} images it reaches "
        f"<strong>{esc(pct(metrics.get('accuracy')))}</strong> accuracy "
        f"(top-{esc(metrics.get('top_k', 5))} {esc(pct(metrics.get('top5_accuracy')))}, chance "
        f"{esc(pct(metrics.get('chance_accuracy', 1 / n_classes if n_classes else None)))}).</p>"
    )
    limitations = [
        f"Trained only on the dataset <code>{esc(dataset.get('dataset_hash', '?'))}</code> "
        f"(source {esc(dataset.get('source', '?'))}); it knows only these {n_classes} classes and always "
        "answers with one of them, even for images of something else.",
        f"Input: an RGB image resized to {esc(size_text)} (aspect ratio ignored), float32 pixels in "
        "[0, 255]; "
        "preprocessing for the architecture is inside the model.",
        "Performance was measured on the held-out test split of "
        f"{esc(n_test if n_test is not None else '?')} "
        "images from the same source; photos from other cameras, crops or populations may score lower.",
        "Not for safety-critical use or decisions about people; a human should review its outputs "
        "where mistakes matter.",
    ]
    if worst:
        limitations.append("Weakest classes by recall: " + ", ".join(
            f"{esc(label)} ({esc(pct(s.get('recall')))})" for label, s in worst) + ".")

    metrics_table = "".join(
        f"<tr><th>{esc(name)}</th><td class=\"num\">{esc(value)}</td></tr>"
        for name, value in (
            ("accuracy", pct(metrics.get("accuracy"))),
            (f"top-{metrics.get('top_k', 5)} accuracy", pct(metrics.get("top5_accuracy"))),
            ("log loss (Kaggle, clipped 1e-15)", num(metrics.get("log_loss"))),
            ("macro F1", num(metrics.get("macro_f1"))),
            ("expected calibration error (15 bins)", num(metrics.get("ece"))),
            ("chance accuracy (1/K)", pct(metrics.get("chance_accuracy"))),
            ("test images", metrics.get("n", "-")),
        ))
    figures = []
    for kind, path in (images or {}).items():
        uri = _embed_png(Path(path))
        if uri is None:
            continue
        caption = _IMAGE_TITLES.get(kind, kind)
        figures.append(f"<figure><img src=\"{uri}\" alt=\"{esc(caption)}\"><figcaption>{esc(caption)}"
                       "</figcaption></figure>")

    lineage_rows = "".join(
        f"<tr><th>{esc(key)}</th><td>"
        + (f"<pre>{esc(json.dumps(to_jsonable(value), indent=2, sort_keys=True))}</pre>"
           if isinstance(value, (Mapping, list, tuple)) else esc(value))
        + "</td></tr>"
        for key, value in lineage.items())

    body = "\n".join([
        f"<h1>{esc(title)}</h1>",
        "<h2>Summary</h2>", summary,
        "<h2>Intended use and limitations</h2>",
        "<p>Intended for classifying photos like those it was trained on into the classes listed below.</p>",
        "<ul>" + "".join(f"<li>{item}</li>" for item in limitations) + "</ul>",
        "<h2>Data</h2>", dataset_section(dataset),
        "<h3>Data quality</h3>", quality_section(quality),
        "<h2>Metrics on the test split</h2>", f"<table>{metrics_table}</table>",
        "<h3>Confused classes</h3>", confusion_section(confusions, per_class),
        "<h2>Leaderboard of this run</h2>", leaderboard_html_table(leaderboard),
        "<h2>Gate decision</h2>", decision_section(decision),
        "<h2>Figures</h2>", "<div class=\"figures\">" + "".join(figures) + "</div>" if figures
        else "<p class=\"muted\">No figures were provided.</p>",
        "<h2>Classes</h2>",
        f"<details><summary>{n_classes} classes, index = output unit</summary><ol start=\"0\">"
        + "".join(f"<li>{esc(label)}</li>" for label in labels) + "</ol></details>",
        "<h2>Lineage</h2>",
        f"<table>{lineage_rows}</table>" if lineage_rows else "<p class=\"muted\">(none)</p>",
    ])
    return html_page(title, body)
