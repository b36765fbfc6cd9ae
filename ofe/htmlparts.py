"""Small HTML pieces the report's sections share: a figure (its chart, caption and exported files),
escaping and number formatting. Kept apart so each section module can use them without import cycles."""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import math
import re
from collections.abc import Callable

import altair as alt

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


def figure_html(figure: Figure, number: str, links: dict[str, str]) -> str:
    """The figure: its chart's div, its Vega-Lite spec as a JSON block the loader script reads, and a
    caption with links to the exported files."""
    # "<" escaped as \u003c is still the same JSON, and no "</script>" in a value can end the block early.
    payload = json.dumps(figure.spec, allow_nan=False).replace("<", "\\u003c")
    div_id = f"fig-{figure.stem}"
    downloads = " ".join(f'<a href="{esc(href)}">{fmt.upper()}</a>' for fmt, href in links.items())
    label = f"Figure {number}" + (" (headline)" if figure.headline else "")
    opening = '<figure class="headline">' if figure.headline else "<figure>"
    return (
        f"{opening}\n"
        f'<div class="chart" id="{div_id}"></div>\n'
        f'<script type="application/json" class="chart-spec" data-target="{div_id}">{payload}</script>\n'
        f"<figcaption><b>{label}.</b> {esc(figure.caption)} "
        f'<span class="downloads">Download:{" " + downloads if downloads else ""}</span></figcaption>\n'
        "</figure>"
    )


def esc(text: object) -> str:
    return html.escape(str(text))


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
