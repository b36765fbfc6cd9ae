"""What the report's modules share to put a page together: a figure (its chart, caption and exported
files), number and value formatting, and the Jinja2 templates (`ofe/report/templates/`) that write every line of
HTML. Kept apart so each section module can use them without import cycles.

The Python side only prepares data: dicts and lists of already formatted strings and numbers. The
templates escape every value they write (autoescape), except where a filter says the text is script
content: `json_script` (a chart's Vega-Lite spec) and `inline_script` (the Vega bundle).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import altair as alt
import jinja2
from markupsafe import Markup

# (figure stem) -> {format: href of the exported file}
Links = Callable[[str], dict[str, str]]


@dataclasses.dataclass(frozen=True)
class Figure:
    """One chart of the page: `stem` names its div (`fig-<stem>`) and its exported files (`<stem>.svg`)."""

    stem: str
    chart: alt.TopLevelMixin
    caption: str
    headline: bool = False

    @functools.cached_property
    def spec(self) -> dict:
        """The chart's Vega-Lite spec (computed once: the page and the exports share it)."""
        # The report's charts can hold more rows than Altair's default 5000-row guard allows.
        with alt.data_transformers.disable_max_rows():
            return self.chart.to_dict()


def figure_context(figure: Figure, number: str, links: dict[str, str]) -> dict:
    """What the `figure` macro of tables.html.j2 writes: the chart's div id, its spec (the loader script
    reads it from a JSON block), its label, caption and the links to its exported files."""
    label = f"Figure {number}" + (" (headline)" if figure.headline else "")
    return {
        "div_id": f"fig-{figure.stem}",
        "spec": figure.spec,
        "label": label,
        "headline": figure.headline,
        "caption": figure.caption,
        "downloads": [{"format": fmt.upper(), "href": href} for fmt, href in links.items()],
    }


def render(template: str, **context: object) -> str:
    """`ofe/report/templates/<template>` rendered with `context`; a variable the template uses but `context`
    lacks raises `jinja2.UndefinedError` instead of printing nothing."""
    return _environment().get_template(template).render(**context)


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("ofe.report", "templates"),
        # Every template here writes HTML: escape by default, whatever a template's name.
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default=True),
        undefined=jinja2.StrictUndefined,
        # Block tags on lines of their own leave no blank lines and no indentation behind.
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["json_script"] = json_script
    env.filters["inline_script"] = inline_script
    return env


def json_script(value: object) -> Markup:
    """`value` as JSON to place inside a <script> element: HTML entities mean nothing there, so it is not
    HTML-escaped; "<" written as \\u003c is still the same JSON, and no "</script>" in a value can end
    the element early."""
    if isinstance(value, jinja2.Undefined):
        str(value)  # a missing variable: StrictUndefined raises on use, naming it
    return Markup(json.dumps(value, allow_nan=False).replace("<", "\\u003c"))


def inline_script(code: str) -> Markup:
    """JavaScript source to inline in a <script> element. A literal "</script" inside it would end the
    element early; "<\\/" means the same in the only places it can occur (string, template and regex
    literals, comments)."""
    # str(): a missing variable (StrictUndefined) raises here, naming it.
    return Markup(re.sub(r"</(script)", r"<\\/\1", str(code), flags=re.IGNORECASE))


def cell(text: object, cls: str | None = None, title: str | None = None, rel: str | None = None,
         href: str | None = None) -> dict:
    """One table cell for the `table` macro: its text, CSS class, tooltip, a relative change shown after
    the text ("(+1.2%)") and a link."""
    return {"text": "" if text is None else str(text), "cls": cls, "title": title, "rel": rel, "href": href}


def relative_href(target: Path, start: Path) -> str:
    """A relative URL from the folder `start` to `target` (both resolved), e.g. "../results/runs/x"."""
    rel = os.path.relpath(Path(target).resolve(), Path(start).resolve())
    return urllib.parse.quote(Path(rel).as_posix())


def fmt_value(value: object) -> str:
    """A grid value in a table cell: floats by %g, None as empty."""
    if isinstance(value, float):
        return f"{value:g}"
    return "" if value is None else str(value)


def fmt_number(value: object, fmt: str) -> str:
    """`value` formatted by `fmt`, or "" when it is missing or not a number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return ""
    return "" if math.isnan(number) else format(number, fmt)


def to_slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]+", "-", text).strip("-") or "x"


def as_list(value: object) -> list[str]:
    """A `studies` cell (list, numpy array or missing) as a list of names."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return [str(v) for v in value]
