"""One self-contained HTML report of an ablation: provenance, summary, one section per study, runs table.

The page opens offline: the Vega, Vega-Lite and vega-embed JavaScript is inlined once (the bundle
`vl_convert.javascript_bundle()` builds, a classic script that sets `window.vegaEmbed`), each chart's
Vega-Lite spec sits in a `<script type="application/json">` block beside its `<div>`, and a final script
hands every spec to `vegaEmbed`.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import altair as alt
import pandas as pd
import vl_convert

from ofe import plots
from ofe.results import atomic_write_text, read_metadata

# (slug, chart function) of the figures every study section shows, in page order.
FIGURES: tuple[tuple[str, Callable[[pd.DataFrame], alt.TopLevelMixin]], ...] = (
    ("kurtosis-over-steps", plots.kurtosis_over_steps),
    ("final-layer-kurtosis", plots.final_layer_kurtosis),
    ("final-layer-mmr", plots.final_layer_mmr),
    ("final-layer-token-correlation", plots.final_layer_token_correlation),
    ("loss-curves", plots.loss_curves),
)

KNOWN_GRID_COLUMNS = ("block", "scale", "optimizer", "beta", "lr", "seed")

# vega-embed options: SVG keeps text crisp; the "open in editor" action needs the network, so it is off.
EMBED_OPTIONS = {"renderer": "svg", "actions": {"export": True, "source": True, "compiled": False, "editor": False}}

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1, h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
.question { font-style: italic; }
.chart { margin: 1.5em 0; overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.status-completed { color: #1a7f37; } .status-diverged { color: #b35900; }
.status-failed, .status-missing { color: #c62828; }
.error { font-family: monospace; max-width: 30em; word-break: break-word; }
"""

# Runs every chart spec of the page through vegaEmbed; a failing chart says so in its own div. It declares
# nothing at top level: the bundle's own top-level names (n, t, ...) share the page's global scope.
LOADER_JS = """
for (const block of document.querySelectorAll('script.chart-spec')) {
  const target = document.getElementById(block.dataset.target);
  vegaEmbed(target, JSON.parse(block.textContent), %s).catch((err) => {
    target.textContent = 'chart failed to render: ' + err;
    console.error(err);
  });
}
""" % json.dumps(EMBED_OPTIONS)


def build_report(results_dir: Path, out_html: Path) -> Path:
    """Write the HTML report of `results_dir/{runs,metrics}.parquet` to `out_html` (atomically); return its path."""
    results_dir, out_html = Path(results_dir), Path(out_html)
    runs_path = results_dir / "runs.parquet"
    runs = pd.read_parquet(runs_path)
    metrics = pd.read_parquet(results_dir / "metrics.parquet")
    meta = read_metadata(runs_path)
    grid = grid_columns(runs, meta)
    body = [
        "<h1>Outlier features: ablation report</h1>",
        _provenance_html(meta.get("provenance", {})),
        _summary_html(runs),
    ]
    for index, (name, study) in enumerate(studies(meta)):
        body.append(_study_html(index, name, study, runs, metrics))
    body.append(_runs_table_html(runs, grid))
    atomic_write_text(out_html, _page("Outlier features: ablation report", "\n".join(body)))
    return out_html


def studies(meta: dict) -> list[tuple[str, dict]]:
    """(name, {title, question, axes}) of each study in metadata order.

    A list of dicts with a `name` key keeps the config's order even through JSON written with sorted
    keys; a dict (name -> study) is taken in the order it has.
    """
    raw = meta.get("studies") or {}
    if isinstance(raw, list):
        return [(study["name"], study) for study in raw]
    return list(raw.items())


def grid_columns(runs: pd.DataFrame, meta: dict) -> list[str]:
    """The grid columns from the metadata, else the known ones present in `runs`."""
    listed = meta.get("grid_columns")
    if listed:
        return [c for c in listed if c in runs.columns]
    return [c for c in KNOWN_GRID_COLUMNS if c in runs.columns]


def run_labels(runs: pd.DataFrame, axes: list[str]) -> pd.Series:
    """One label per run from its values on the study's swept axes, e.g. "block=op, lr=0.003" (run_id if none)."""
    axes = [a for a in axes if a in runs.columns]
    if not axes:
        return runs["run_id"].astype(str)
    labels = [", ".join(f"{a}={_format_value(row[a])}" for a in axes) for row in runs[axes].to_dict("records")]
    return pd.Series(labels, index=runs.index, dtype=str)


def study_runs(runs: pd.DataFrame, name: str) -> pd.DataFrame:
    """The runs whose `studies` list contains `name`."""
    return runs[runs["studies"].map(lambda names: name in _as_list(names))]


def _study_html(index: int, name: str, study: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> str:
    members = study_runs(runs, name)
    labels = dict(zip(members["run_id"], run_labels(members, list(study.get("axes", [])))))
    subset = metrics[metrics["run_id"].isin(labels)]
    subset = subset.assign(label=subset["run_id"].map(labels))
    parts = [
        f"<section id=\"study-{_slug(name)}\">",
        f"<h2>{_esc(study.get('title') or name)}</h2>",
        f"<p class=\"question\">{_esc(study.get('question', ''))}</p>",
        f"<p>Study <code>{_esc(name)}</code>, swept axes: {_esc(', '.join(study.get('axes', [])) or 'none')}; "
        f"{_status_counts(members)}.</p>",
    ]
    for slug, figure in FIGURES:
        parts.append(_chart_html(f"fig-{index}-{slug}", figure(subset)))
    parts.append("</section>")
    return "\n".join(parts)


def _chart_html(div_id: str, chart: alt.TopLevelMixin) -> str:
    """The chart's div and its Vega-Lite spec as a JSON block the loader script reads."""
    # The report's charts can hold more rows than Altair's default 5000-row guard allows.
    with alt.data_transformers.disable_max_rows():
        spec = chart.to_dict()
    # "<" escaped as \u003c is still the same JSON, and no "</script>" in a value can end the block early.
    payload = json.dumps(spec, allow_nan=False).replace("<", "\\u003c")
    return (
        f'<div class="chart" id="{div_id}"></div>\n'
        f'<script type="application/json" class="chart-spec" data-target="{div_id}">{payload}</script>'
    )


def _provenance_html(prov: dict) -> str:
    git = prov.get("git") or {}
    dirty = git.get("dirty")
    state = "unknown" if dirty is None else ("dirty (uncommitted changes)" if dirty else "clean")
    libraries = ", ".join(f"{k} {v}" for k, v in (prov.get("libraries") or {}).items() if v) or "unknown"
    machine = ", ".join(f"{k}: {v}" for k, v in (prov.get("machine") or {}).items()) or "unknown"
    items = [
        ("git revision", f"{git.get('revision') or 'unknown'} ({state})"),
        ("python", prov.get("python") or "unknown"),
        ("libraries", libraries),
        ("machine", machine),
        ("date", prov.get("date") or "unknown"),
    ]
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in items)
    return f"<h2>Provenance</h2>\n<table class=\"provenance\">{rows}</table>"


def _summary_html(runs: pd.DataFrame) -> str:
    wall_h = pd.to_numeric(runs["wall_s"], errors="coerce").sum() / 3600
    return (
        "<h2>Summary</h2>\n"
        f"<p>{len(runs)} runs: {_status_counts(runs)}. Total wall time {wall_h:.2f} h.</p>\n"
        "<p>Kurtosis is the paper's uncentred Kurt of the neuron RMS values (1 = all neurons equal); "
        "the centred variant of the public code is logged too but not plotted.</p>"
    )


def _status_counts(runs: pd.DataFrame) -> str:
    counts = runs["status"].value_counts()
    return ", ".join(f"{n} {status}" for status, n in counts.items()) or "no runs"


def _runs_table_html(runs: pd.DataFrame, grid: list[str]) -> str:
    header = ["run_id", *grid, "studies", "status", "final val loss", "peak kurtosis", "tokens/s", "error"]
    rows = [_run_row(run, grid) for run in runs.to_dict("records")]
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    return f"<h2>Runs</h2>\n<table class=\"runs\">\n<tr>{head}</tr>\n" + "\n".join(rows) + "\n</table>"


def _run_row(run: dict, grid: list[str]) -> str:
    status = str(run.get("status"))
    cells = [f"<td>{_esc(run['run_id'])}</td>"]
    cells += [f"<td>{_esc(_format_value(run.get(c)))}</td>" for c in grid]
    cells.append(f"<td>{_esc(', '.join(_as_list(run.get('studies'))))}</td>")
    cells.append(f'<td class="status-{_slug(status)}">{_esc(status)}</td>')
    cells.append(f'<td class="num">{_number(run.get("final_val_loss"), ".4f")}</td>')
    cells.append(f'<td class="num">{_number(run.get("peak_kurtosis"), ".4g")}</td>')
    cells.append(f'<td class="num">{_number(run.get("tokens_per_s"), ",.0f")}</td>')
    cells.append(f'<td class="error">{_esc(_last_line(run.get("error")))}</td>')
    return "<tr>" + "".join(cells) + "</tr>"


def _page(title: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{_esc(title)}</title>
<style>{CSS}</style>
<script>
{_vega_bundle()}
</script>
</head>
<body>
{body}
<script>{LOADER_JS}</script>
</body>
</html>
"""


def _vega_bundle() -> str:
    """vega + vega-lite + vega-embed, for the Vega-Lite version Altair writes specs for, as one classic script."""
    major_minor = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    bundle = vl_convert.javascript_bundle(vl_version=major_minor)
    # A literal "</script" inside the inlined code would end the script element early; "<\/" means the
    # same in the only places it can occur (string, template and regex literals, comments).
    return re.sub(r"</(script)", r"<\\/\1", bundle, flags=re.IGNORECASE)


def _as_list(value: object) -> list[str]:
    """A `studies` cell (list, numpy array or missing) as a list of names."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return [str(v) for v in value]


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "" if value is None else str(value)


def _number(value: object, fmt: str) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return ""
    return "" if math.isnan(number) else format(number, fmt)


def _last_line(error: object) -> str:
    if not isinstance(error, str) or not error.strip():
        return ""
    return error.strip().splitlines()[-1]


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]+", "-", text).strip("-") or "x"


def _esc(text: object) -> str:
    return html.escape(str(text))
