"""One self-contained HTML report of an ablation: provenance, summary, one section per study, int8
quantisation (when `quant.parquet` has rows), runs table.

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

# Quantisation protocols in page order (others follow alphabetically) and their short column names.
QUANT_PROTOCOLS = ("static_per_tensor", "dynamic_per_token")
PROTOCOL_SHORT = {"static_per_tensor": "static", "dynamic_per_token": "dynamic"}
# Grid columns the int8 table always shows (the paper's table); any other one is shown when it varies.
QUANT_TABLE_COLUMNS = ("block", "optimizer")
QUANT_EXPLANATION = (
    "Post-training fake quantisation of the final checkpoint, weights and activations at the same bit width "
    "(W8A8 = 8 bits). <b>static</b>: per-tensor ranges calibrated on training batches, activations "
    "quantised everywhere including the residual stream (the paper's likely W8A8 protocol, the one that "
    "exposes outliers); <b>dynamic</b>: per-channel weights and per-token dynamic ranges on linear-layer "
    "inputs only (the forgiving one). Cells give validation perplexity after quantisation and, in "
    "brackets, its change relative to full precision (ppl fp); mean Kurt = the paper's kurtosis averaged "
    "over layers at the run's last logged step; rows sorted by it; - = no value (e.g. a diverged run)."
)

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
.rel { color: #666; font-size: .9em; }
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
    quant = load_quant(results_dir)
    meta = read_metadata(runs_path)
    grid = grid_columns(runs, meta)
    body = [
        "<h1>Outlier features: ablation report</h1>",
        _provenance_html(meta.get("provenance", {})),
        _summary_html(runs),
    ]
    for index, (name, study) in enumerate(studies(meta)):
        body.append(_study_html(index, name, study, runs, metrics, quant))
    if not quant.empty:
        body.append(_quant_section_html(quant, grid))
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


def load_quant(results_dir: Path) -> pd.DataFrame:
    """`results_dir/quant.parquet`, or an empty frame where it is absent (results from before it existed)."""
    path = Path(results_dir) / "quant.parquet"
    return pd.read_parquet(path) if path.exists() else pd.DataFrame()


def quant_protocol_bits(quant: pd.DataFrame) -> list[tuple[str, int]]:
    """The (protocol, bits) pairs present, in page order: known protocols first, then widest bits first."""
    pairs = {(str(p), int(b)) for p, b in zip(quant["protocol"], quant["bits"])}
    rank = {p: i for i, p in enumerate(QUANT_PROTOCOLS)}
    return sorted(pairs, key=lambda pb: (rank.get(pb[0], len(rank)), pb[0], -pb[1]))


def quant_column_name(protocol: str, bits: int) -> str:
    """The int8 table's header of one protocol and bit width, e.g. "static W8A8"."""
    return f"{PROTOCOL_SHORT.get(protocol, protocol)} W{bits}A{bits}"


def quant_table(quant: pd.DataFrame, id_columns: list[str]) -> pd.DataFrame:
    """One row per run: run_id, `id_columns`, status, mean_kurtosis, ppl_fp, then ppl_q under each
    `quant_column_name`; sorted by mean kurtosis (missing last), then run_id."""
    first = {c: "first" for c in [*id_columns, "status", "mean_kurtosis", "ppl_fp"] if c in quant.columns}
    per_run = quant.groupby("run_id", sort=False).agg(first)
    for column in ("status", "mean_kurtosis", "ppl_fp"):
        if column not in per_run.columns:
            per_run[column] = math.nan
    ppl_q = quant.groupby(["run_id", "protocol", "bits"])["ppl_q"].first()
    for protocol, bits in quant_protocol_bits(quant):
        per_run[quant_column_name(protocol, bits)] = ppl_q.xs((protocol, bits), level=("protocol", "bits"))
    table = per_run.reset_index().sort_values(["mean_kurtosis", "run_id"], na_position="last", kind="stable")
    return table.reset_index(drop=True)


def study_runs(runs: pd.DataFrame, name: str) -> pd.DataFrame:
    """The runs whose `studies` list contains `name`."""
    return runs[runs["studies"].map(lambda names: name in _as_list(names))]


def _study_html(
    index: int, name: str, study: dict, runs: pd.DataFrame, metrics: pd.DataFrame, quant: pd.DataFrame
) -> str:
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
    if not quant.empty:
        in_study = quant[quant["run_id"].isin(labels)]
        if not in_study.empty:
            in_study = in_study.assign(configuration=in_study["run_id"].map(labels))
            parts.append(
                "<h3>int8 quantisation</h3>\n<p>Validation perplexity after quantisation of this study's runs "
                '(definitions in <a href="#int8">int8 quantisation</a>).</p>'
            )
            parts.append(_quant_table_html(quant_table(in_study, ["configuration"]), ["configuration"], in_study))
    parts.append("</section>")
    return "\n".join(parts)


def _quant_section_html(quant: pd.DataFrame, grid: list[str]) -> str:
    """The paper's int8 table over every run, then one degradation scatter per protocol."""
    runs = quant.drop_duplicates("run_id")
    shown = [
        c for c in grid
        if c in quant.columns and (c in QUANT_TABLE_COLUMNS or runs[c].nunique(dropna=False) > 1)
    ]
    parts = [
        '<section id="int8">',
        "<h2>int8 quantisation</h2>",
        f"<p>{QUANT_EXPLANATION}</p>",
        _quant_table_html(quant_table(quant, shown), shown, quant),
    ]
    protocols = dict.fromkeys(p for p, _ in quant_protocol_bits(quant))
    for protocol in protocols:
        chart = plots.quant_degradation_scatter(quant, protocol)
        parts.append(_chart_html(f"fig-quant-{_slug(protocol)}", chart))
    parts.append("</section>")
    return "\n".join(parts)


def _quant_table_html(table: pd.DataFrame, id_columns: list[str], quant: pd.DataFrame) -> str:
    """`quant_table` as HTML: ppl_q cells carry their change relative to ppl fp; the status column
    appears only when some run did not complete; the row's tooltip is its run_id."""
    q_columns = [quant_column_name(p, b) for p, b in quant_protocol_bits(quant)]
    with_status = bool((table["status"].fillna("missing") != "completed").any())
    header = [*id_columns, *(["status"] if with_status else []), "mean Kurt", "ppl fp", *q_columns]
    rows = []
    for run in table.to_dict("records"):
        cells = [f"<td>{_esc(_format_value(run.get(c)))}</td>" for c in id_columns]
        if with_status:
            status = str(run.get("status"))
            cells.append(f'<td class="status-{_slug(status)}">{_esc(status)}</td>')
        cells.append(f'<td class="num">{_number(run.get("mean_kurtosis"), ".3g") or "-"}</td>')
        cells.append(f'<td class="num">{_perplexity(run.get("ppl_fp"))}</td>')
        for column in q_columns:
            cells.append(f'<td class="num">{_perplexity(run.get(column), reference=run.get("ppl_fp"))}</td>')
        rows.append(f'<tr title="{_esc(run["run_id"])}">' + "".join(cells) + "</tr>")
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    return f'<table class="quant">\n<tr>{head}</tr>\n' + "\n".join(rows) + "\n</table>"


def _perplexity(value: object, reference: object = None) -> str:
    """A perplexity as HTML ("-" if missing), with its relative change to `reference` when both are finite."""
    try:
        ppl = float(value)
    except (TypeError, ValueError):
        return "-"
    if math.isnan(ppl):
        return "-"
    text = f"{ppl:.2f}" if abs(ppl) < 1e5 else f"{ppl:.3g}"
    try:
        rel = ppl / float(reference) - 1.0
    except (TypeError, ValueError, ZeroDivisionError):
        return text
    if not math.isfinite(rel):
        return text
    pct = 100 * rel
    change = f"{pct:+,.0f}%" if abs(pct) >= 100 else f"{pct:+.1f}%" if abs(pct) >= 1 else f"{pct:+.2f}%"
    return f'{text} <span class="rel">({change})</span>'


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
    header = [
        "run_id", *grid, "studies", "status", "final val loss", "final mean kurtosis", "peak kurtosis", "tokens/s",
        "error",
    ]
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
    cells.append(f'<td class="num">{_number(run.get("final_mean_kurtosis"), ".4g")}</td>')
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
