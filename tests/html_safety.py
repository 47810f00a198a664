"""A checker for the HTML the product writes: nothing in it may run script or load from elsewhere.

Invariant 7 (docs: DESIGN.md) says no served page runs script from data or loads anything from the
internet. Every page the product writes (run report, leaderboard, model card, data-quality page,
registry pages) is checked with `find_problems`, and hostile strings planted in the data with
`assert_escaped`. The parser is the standard library's `html.parser`, which, like a browser,
decodes character references in attribute values, so ``&#106;avascript:`` is seen as
``javascript:``.

What counts as a problem:

- executable or navigating elements: script, iframe, frame, frameset, object, embed, applet, base,
  portal, form, and ``<meta http-equiv="refresh">``;
- any ``on*`` event-handler attribute, and ``formaction``;
- in URL attributes (href, src, srcset, action, poster, data, ...): a ``javascript:``/``vbscript:``
  URL, a ``data:`` URL other than a raster image, any other scheme (``http:``, ``https:``, ``ftp:``
  ...), or a scheme-relative ``//host`` (also spelt with backslashes);
- in ``<style>`` elements and ``style`` attributes: any ``@import``, ``expression(``,
  ``javascript:``, and any ``url()`` that is not relative or a raster ``data:image``.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from html.parser import HTMLParser

EXECUTABLE_TAGS = frozenset(
    {"script", "iframe", "frame", "frameset", "object", "embed", "applet", "base", "portal", "form"}
)
URL_ATTRIBUTES = frozenset(
    {"href", "src", "srcset", "action", "formaction", "poster", "data", "background", "cite", "codebase",
     "archive", "longdesc", "lowsrc", "dynsrc", "manifest", "ping", "icon", "xlink:href", "usemap", "itemtype"}
)
# data: URIs a page may embed (the model card's figures); SVG can carry script, HTML is a page.
SAFE_DATA_PREFIXES = ("data:image/png", "data:image/jpeg", "data:image/gif", "data:image/webp")
_SCHEME = re.compile(r"^([a-z][a-z0-9+.\-]*):")
# Browsers drop ASCII tab/newline anywhere in a URL and C0 controls/space at its ends.
_URL_IGNORED = re.compile(r"[\t\n\r]")
_CSS_URL = re.compile(r"url\(\s*(['\"]?)(.*?)\1\s*\)", re.IGNORECASE | re.DOTALL)
_CSS_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)
_CSS_ESCAPE = re.compile(r"\\([0-9a-fA-F]{1,6})\s?|\\(.)")


@dataclass(frozen=True)
class Problem:
    """One unsafe construct: where it is (1-based line, 0-based column), which rule, what was seen."""

    line: int
    column: int
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"line {self.line} col {self.column}: {self.rule}: {self.detail}"


def url_problem(url: str) -> str | None:
    """Why `url` (already entity-decoded) must not appear in a page, or None when it is relative/safe."""
    cleaned = _URL_IGNORED.sub("", url).strip("\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c\x0e\x0f"
                                               "\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b"
                                               "\x1c\x1d\x1e\x1f \x7f")
    lowered = cleaned.lower()
    if lowered.replace("\\", "/").startswith("//"):
        return "scheme-relative URL (loads from another host)"
    scheme = _SCHEME.match(lowered)
    if scheme is None:
        return None
    name = scheme.group(1)
    if name in ("javascript", "vbscript"):
        return f"{name}: URL"
    if name == "data":
        return None if lowered.startswith(SAFE_DATA_PREFIXES) else "data: URL that is not a raster image"
    return f"external URL (scheme {name}:)"


def _css_unescape(css: str) -> str:
    def repl(match: re.Match[str]) -> str:
        if match.group(1):
            code = int(match.group(1), 16)
            return chr(code) if 0 < code <= 0x10FFFF else "\ufffd"
        return match.group(2)

    return _CSS_ESCAPE.sub(repl, css)


def css_problems(css: str) -> list[str]:
    """Reasons the CSS text `css` is not self-contained or could run script."""
    text = _css_unescape(_CSS_COMMENT.sub("", css))
    lowered = text.lower()
    found = []
    if "@import" in lowered:
        found.append("CSS @import")
    if "expression(" in lowered.replace(" ", ""):
        found.append("CSS expression()")
    if "javascript:" in lowered.replace(" ", ""):
        found.append("javascript: in CSS")
    for match in _CSS_URL.finditer(text):
        why = url_problem(match.group(2))
        if why:
            found.append(f"CSS url({match.group(2)[:80]!r}): {why}")
    return found


class _Checker(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[Problem] = []
        self.texts: list[str] = []
        self.attribute_values: list[str] = []
        self._in_style = 0

    def _add(self, rule: str, detail: str) -> None:
        line, column = self.getpos()
        self.problems.append(Problem(line, column, rule, detail))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._element(tag, attrs)
        if tag == "style":
            self._in_style += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._element(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag == "style" and self._in_style:
            self._in_style -= 1

    def _element(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in EXECUTABLE_TAGS:
            self._add("executable element", f"<{tag}>")
        values = {name: value or "" for name, value in attrs}
        if tag == "meta" and values.get("http-equiv", "").strip().lower() == "refresh":
            self._add("executable element", "<meta http-equiv=refresh>")
        for name, value in attrs:
            value = value or ""
            self.attribute_values.append(value)
            if name.startswith("on"):
                self._add("event-handler attribute", f"<{tag} {name}={value[:80]!r}>")
            if name == "formaction":
                self._add("form action attribute", f"<{tag} formaction={value[:80]!r}>")
            if name in URL_ATTRIBUTES:
                urls = [part.strip().split(" ")[0] for part in value.split(",")] if name == "srcset" else [value]
                for url in urls:
                    why = url_problem(url)
                    if why:
                        self._add("unsafe URL", f"<{tag} {name}={url[:80]!r}>: {why}")
            if name == "style":
                for why in css_problems(value):
                    self._add("unsafe inline style", f"<{tag}>: {why}")

    def handle_data(self, data: str) -> None:
        self.texts.append(data)
        if self._in_style:
            for why in css_problems(data):
                self._add("unsafe stylesheet", why)


def _parse(page: str) -> _Checker:
    checker = _Checker()
    checker.feed(page)
    checker.close()
    return checker


def find_problems(page: str) -> list[Problem]:
    """Every executable or externally-loading construct in the HTML text `page`."""
    return _parse(page).problems


def assert_safe(page: str, *, source: str = "page") -> None:
    """Fail with every problem listed (and where) unless `page` is self-contained and script-free."""
    problems = find_problems(page)
    assert not problems, f"{source} is not safe HTML:\n" + "\n".join(f"  {p}" for p in problems)


def assert_escaped(page: str, hostile: str, *, source: str = "page", must_appear: bool = True) -> None:
    """Fail if `hostile` reaches `page` as markup rather than as text.

    The raw string may appear only when escaping leaves it unchanged (``perro español``); otherwise
    only its escaped form may. With `must_appear`, the string must also survive intact as the text
    of one element or one attribute value once parsed, which proves it was neither dropped,
    truncated, split into markup, nor evaluated as a template (``{{7*7}}`` staying ``{{7*7}}``).
    """
    if html.escape(hostile, quote=True) != hostile and hostile in page:
        at = page.index(hostile)
        raise AssertionError(f"{source} contains {hostile!r} unescaped at offset {at}: "
                             f"...{page[max(0, at - 60):at + len(hostile) + 20]!r}...")
    if must_appear:
        parsed = _parse(page)
        if not any(hostile in text for text in parsed.texts + parsed.attribute_values):
            raise AssertionError(f"{source} does not show {hostile!r} as text: dropped, altered or split "
                                 "into markup")
