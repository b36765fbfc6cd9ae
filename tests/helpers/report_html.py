"""Reading a built report page in tests: its chart specs and their data rows, a section, a table."""

from __future__ import annotations

import json
import re


def chart_specs(page: str) -> dict[str, dict]:
    """target div id -> parsed Vega-Lite spec of every chart-spec block of the page."""
    pattern = r'<script type="application/json" class="chart-spec" data-target="([^"]+)">(.*?)</script>'
    return {target: json.loads(payload) for target, payload in re.findall(pattern, page, re.S)}


def spec_values(spec: dict) -> list[dict]:
    """All inline data rows of a spec (Altair consolidates them under top-level `datasets`)."""
    return [row for rows in spec.get("datasets", {}).values() for row in rows]


def page_section(page: str, section_id: str) -> str:
    match = re.search(rf'<section id="{section_id}">(.*?)</section>', page, re.S)
    assert match, f"no section {section_id}"
    return match.group(1)


def table_rows(html_text: str) -> tuple[list[str], dict[str, list[str]]]:
    """(header, row title -> cell texts without tags) of the first table in `html_text`."""
    table = re.search(r"<table.*?</table>", html_text, re.S).group(0)
    header = re.findall(r"<th>(.*?)</th>", table)
    rows = {title: [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", body)]
            for title, body in re.findall(r'<tr title="([^"]+)">(.*?)</tr>', table)}
    return header, rows
