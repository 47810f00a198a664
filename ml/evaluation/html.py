"""The HTML kit every page of the product is built with: one stylesheet, escaping, number formats.

Pages are self-contained (inline CSS, images as data: URIs or relative links, no script, nothing
from the internet): they are opened from object storage, from a laptop, and under the Airflow
origin by the registry plugin. Everything that came from data goes through `esc`.
"""

from __future__ import annotations

import html
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #3b75af;padding-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .55em}
th{background:#eef3f8;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.failed td{color:#888}tr.over-budget td{background:#fff4e5}
tr.production td{background:#fdecea;font-weight:600}
tr.best td{background:#eaf6ea}.ok{color:#1e7b34}.bad{color:#b3261e}.no{color:#b45309}.warn{color:#a15c00}
.muted{color:#666;font-size:.9em}code,pre{background:#f5f5f5;padding:.1em .3em;border-radius:3px}
pre{padding:.6em;overflow-x:auto;font-size:.85em}img{max-width:100%;border:1px solid #ddd}
.figures{display:flex;flex-wrap:wrap;gap:1em}.figures figure{margin:0;flex:1 1 420px}
details{margin:.5em 0}summary{cursor:pointer}
.card{border:1px solid #d1d5db;border-radius:8px;padding:1rem;background:#f8fafc}
.badge{display:inline-block;padding:0 .45rem;border-radius:9px;background:#dbeafe;font-size:.8rem}
"""


def html_page(title: str, body: str, *, css: str = CSS) -> str:
    """A complete, self-contained HTML document (inline CSS, no external assets). `title` is escaped."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)}</title><style>{css}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def esc(value: Any) -> str:
    """html.escape of str(value), quotes included; None becomes ''."""
    return html.escape("" if value is None else str(value), quote=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def num(value: Any, digits: int = 3) -> str:
    """A number with `digits` decimals, or '-' when it is missing or not a number."""
    return f"{value:.{digits}f}" if _is_number(value) else "-"


def pct(value: Any, digits: int = 1) -> str:
    """A fraction as a percentage (0.825 -> '82.5%'), or '-'."""
    return f"{value * 100:.{digits}f}%" if _is_number(value) else "-"
