"""The HTML checker (tests/html_safety.py) itself: it flags every unsafe sample and no safe one."""

from __future__ import annotations

import html

import pytest

from tests.html_safety import assert_escaped, assert_safe, find_problems

UNSAFE = {
    "script element": ("<p>hi</p><script>alert(1)</script>", "executable element"),
    "script with src": ("<script src='app.js'></script>", "executable element"),
    "uppercase script": ("<SCRIPT>alert(1)</SCRIPT>", "executable element"),
    "iframe": ("<iframe src='report.html'></iframe>", "executable element"),
    "object": ("<object data='x.swf'></object>", "executable element"),
    "embed": ("<embed src='x.swf'>", "executable element"),
    "base": ("<base href='/'>", "executable element"),
    "form": ("<form action='/login'><input name=a></form>", "executable element"),
    "formaction": ("<button formaction='/x'>go</button>", "form action attribute"),
    "meta refresh": ("<meta http-equiv='Refresh' content='0;url=/x'>", "executable element"),
    "onerror": ("<img src=x onerror=alert(1)>", "event-handler attribute"),
    "onload on body": ("<body onload='go()'>", "event-handler attribute"),
    "onclick self-closing": ("<a onclick=\"x()\"/>", "event-handler attribute"),
    "javascript href": ("<a href='javascript:alert(1)'>x</a>", "unsafe URL"),
    "javascript href entity-encoded": ("<a href='&#106;avascript:alert(1)'>x</a>", "unsafe URL"),
    "javascript href with tab": ("<a href='java\tscript:alert(1)'>x</a>", "unsafe URL"),
    "javascript href leading space": ("<a href=' JavaScript:alert(1)'>x</a>", "unsafe URL"),
    "vbscript": ("<a href='vbscript:msgbox(1)'>x</a>", "unsafe URL"),
    "data text/html": ("<a href='data:text/html,<script>alert(1)</script>'>x</a>", "unsafe URL"),
    "data svg image": ("<img src='data:image/svg+xml;base64,PHN2Zz4='>", "unsafe URL"),
    "https img": ("<img src='https://cdn.example.com/a.png'>", "unsafe URL"),
    "http stylesheet link": ("<link rel=stylesheet href='http://cdn.example.com/a.css'>", "unsafe URL"),
    "scheme-relative": ("<img src='//cdn.example.com/a.png'>", "unsafe URL"),
    "scheme-relative backslashes": ("<img src='\\\\cdn.example.com/a.png'>", "unsafe URL"),
    "scheme-relative mixed slashes": ("<img src='/\\cdn.example.com/a.png'>", "unsafe URL"),
    "srcset external": ("<img src='a.png' srcset='a.png 1x, https://x.example/b.png 2x'>", "unsafe URL"),
    "video poster": ("<video poster='https://x.example/p.png'></video>", "unsafe URL"),
    "style url": ("<style>body{background:url(https://x.example/bg.png)}</style>", "unsafe stylesheet"),
    "style url quoted": ("<style>body{background:url( \"//x.example/bg.png\" )}</style>", "unsafe stylesheet"),
    "style import": ("<style>@import 'theme.css';</style>", "unsafe stylesheet"),
    "style import escaped": ("<style>@\\69mport 'https://x.example/t.css';</style>", "unsafe stylesheet"),
    "style expression": ("<style>p{width:expression(alert(1))}</style>", "unsafe stylesheet"),
    "inline style url": ("<p style=\"background:url('https://x.example/a.png')\">x</p>", "unsafe inline style"),
    "inline style javascript": ("<p style=\"background:url(javascript:alert(1))\">x</p>", "unsafe inline style"),
}

SAFE = {
    "plain page": "<!DOCTYPE html><html><head><meta charset='utf-8'><title>t</title></head>"
                  "<body><h1>Report</h1><p>a &lt;script&gt; b</p></body></html>",
    "relative links": "<a href='curves.png'>c</a><a href='scratch_tiny/confusion.png'>d</a>"
                      "<a href='../../versions/v1/model_card.html'>card</a><a href='/model-registry/runs/x'>r</a>",
    "fragment and query": "<a href='#top'>top</a><a href='?page=2'>next</a>",
    "png data uri": "<img src='data:image/png;base64,iVBORw0KGgo=' alt='curves'>",
    "jpeg data uri": "<img src='DATA:image/jpeg;base64,/9j/4AAQ' alt='x'>",
    "inline css": "<style>body{font-family:system-ui}td.num{text-align:right}"
                  "img{background:url(data:image/png;base64,AAAA)}</style>",
    "css relative url": "<style>.x{background:url('bg.png')}</style>",
    "text that looks like markup": "<pre>&lt;img src=x onerror=alert(1)&gt; javascript:alert(1) "
                                   "https://example.com @import url(https://x)</pre>",
    "attribute text mentioning on": "<td class='one' title='onerror=alert(1)'>x</td>",
    "escaped attribute": "<img src='a.png' alt='&quot;&gt;&lt;img src=x onerror=alert(1)&gt;'>",
    "meta viewport": "<meta name='viewport' content='width=device-width, initial-scale=1'>",
}


@pytest.mark.parametrize(("page", "rule"), UNSAFE.values(), ids=UNSAFE.keys())
def test_unsafe_samples_are_flagged(page: str, rule: str) -> None:
    problems = find_problems(page)

    assert rule in {p.rule for p in problems}, problems
    with pytest.raises(AssertionError, match=rule):
        assert_safe(page, source="sample")


@pytest.mark.parametrize("page", SAFE.values(), ids=SAFE.keys())
def test_safe_samples_pass(page: str) -> None:
    assert find_problems(page) == []
    assert_safe(page)


def test_problem_names_line_and_construct() -> None:
    page = "<p>ok</p>\n<p>ok</p>\n<img src=x onerror=alert(1)>"

    [problem] = find_problems(page)

    assert (problem.line, problem.rule) == (3, "event-handler attribute")
    assert "onerror" in str(problem) and str(problem).startswith("line 3 ")


HOSTILE = ["<script>alert(1)</script>", "\"><img src=x onerror=alert(1)>", "x_{$^$}", "{{7*7}}",
           "perro español", "it's & <b>"]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_escaped_string_passes_in_text_and_attribute(hostile: str) -> None:
    escaped = html.escape(hostile, quote=True)
    page = f"<p>class {escaped} has 3 images</p><img src='a.png' alt=\"{escaped}\">"

    assert_escaped(page, hostile)
    assert_escaped(f"<img src='a.png' alt='{escaped}'>", hostile)


@pytest.mark.parametrize("hostile", ["<script>alert(1)</script>", "\"><img src=x onerror=alert(1)>"])
def test_raw_markup_is_caught(hostile: str) -> None:
    with pytest.raises(AssertionError, match="unescaped"):
        assert_escaped(f"<td>{hostile}</td>", hostile, source="table")


def test_attribute_escaped_without_quotes_is_caught() -> None:
    # html.escape(..., quote=False) inside an attribute: no raw substring, but the quote breaks out.
    hostile = "\"><img src=x onerror=alert(1)>"
    page = f"<img src='a.png' alt=\"{html.escape(hostile, quote=False)}\">"

    with pytest.raises(AssertionError, match="does not show"):
        assert_escaped(page, hostile)
    assert "event-handler attribute" in {p.rule for p in find_problems(page)}


def test_missing_truncated_or_evaluated_string_is_caught() -> None:
    with pytest.raises(AssertionError, match="does not show"):
        assert_escaped("<li>49</li>", "{{7*7}}")
    with pytest.raises(AssertionError, match="does not show"):
        assert_escaped("<li>perro espa…</li>", "perro español")
    assert_escaped("<li>49</li>", "{{7*7}}", must_appear=False)
