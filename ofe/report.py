"""One self-contained HTML report of an ablation, as a researcher reads it.

- Front page: the grid (each study, its question, swept axes and their values, run counts by status),
  total wall time, a banner while results are partial (runs failed, corrupt or missing), and provenance.
- One section per study: a headline figure that answers the study's question first (for a study that
  sweeps a numeric axis, peak and final mean kurtosis against it, seeds averaged; otherwise per-layer
  kurtosis over training, one panel per configuration, as in the paper's figures 2 and 4), then
  kurtosis over training, kurtosis beside signal propagation per layer, max-median ratio, loss curves
  and the study's int8 table when quantisation results exist.
- int8 quantisation over every run (when `quant.parquet` has rows), then the runs table: configuration,
  status, final loss, kurtosis, the last line of a failed run's error (a corrupt run's reason), a relative
  link to the run folder.

The page opens offline (also from a file:// URL): the Vega, Vega-Lite and vega-embed JavaScript is
inlined once (the bundle `vl_convert.javascript_bundle()` builds, a classic script that sets
`window.vegaEmbed`), each chart's Vega-Lite spec sits in a `<script type="application/json">` block
beside its `<div>`, and a final script hands every spec to `vegaEmbed`. Every figure is also exported
beside the page, as `figures/<study>-<figure>.svg` (and `.png` on request: PNG rendering is the slow
part), linked from its caption.

Partial results render too: a study whose runs are all missing gets its sections with "no data" charts.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import math
import os
import re
import urllib.parse
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import altair as alt
import pandas as pd
import vl_convert

from ofe import plots
from ofe.results import atomic_path, atomic_write_text, read_metadata

# Width of each of the two per-layer charts shown side by side (kurtosis beside signal propagation).
PAIR_WIDTH = 330

# (slug, chart function) of the figures every study section shows, in page order; a study that sweeps a
# numeric axis shows its sweep charts (`sweep_slug`) first, as its headline.
FIGURES: tuple[tuple[str, Callable[[pd.DataFrame], alt.TopLevelMixin]], ...] = (
    ("kurtosis-over-steps", plots.kurtosis_over_steps),
    ("final-layer-kurtosis", partial(plots.final_layer_kurtosis, width=PAIR_WIDTH)),
    ("final-layer-token-correlation", partial(plots.final_layer_token_correlation, width=PAIR_WIDTH)),
    ("final-layer-mmr", plots.final_layer_mmr),
    ("loss-curves", plots.loss_curves),
)
# Figures laid out side by side, in one row that wraps on a narrow window.
SIDE_BY_SIDE = ("final-layer-kurtosis", "final-layer-token-correlation")

# What each figure plots and which metric definition it uses, for its caption (the full definitions are
# in the chart's subtitle).
KURT_SHORT = "Kurt = the paper's uncentred kurtosis of the neuron RMS values (1 = no outlier features)"
CAPTIONS = {
    "kurtosis-over-steps": f"Kurt per layer over training, one panel per configuration, log scale; {KURT_SHORT}.",
    "final-layer-kurtosis": f"Kurt per layer at each run's last logged step, log scale; {KURT_SHORT}.",
    "final-layer-token-correlation": (
        "Signal propagation per layer at each run's last logged step: average token correlation, the mean "
        "off-diagonal cosine similarity between tokens' centred, RMS-normalised activations (near 1 = rank "
        "collapse)."
    ),
    "final-layer-mmr": (
        "Max-median ratio per layer at each run's last logged step, log scale: mean over tokens of "
        "max_j |x_j| / median_j |x_j|."
    ),
    "loss-curves": "Training loss (logged batches) and validation loss against step, log scale, one line per run.",
}
SWEEP_CAPTION = (
    "Peak Kurt (maximum over steps and layers) and final mean Kurt (averaged over layers at the last "
    "logged step) against {axis}{scale}; lines through the mean over seeds, points for each run; {kurt}."
)

KNOWN_GRID_COLUMNS = ("block", "scale", "optimizer", "beta", "lr", "seed")
STATUS_ORDER = ("completed", "diverged", "failed", "corrupt", "missing")
DONE_STATUSES = ("completed", "diverged")  # runs that finished and have results

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
QUANT_CAPTION = (
    "Relative perplexity degradation after {protocol} quantisation (ppl_q / ppl_fp - 1) against mean Kurt "
    "(averaged over layers at the last logged step), one point per run and bit width, with Spearman's rank "
    "correlation per bit width."
)

# PNG exports at twice the chart's CSS size, crisp on a high-density screen or a slide.
PNG_SCALE = 2.0

# vega-embed options: SVG keeps text crisp; the "open in editor" action needs the network, so it is off.
EMBED_OPTIONS = {"renderer": "svg", "actions": {"export": True, "source": True, "compiled": False, "editor": False}}

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; padding: 0 1em; color: #222; }
h1, h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
section { margin-top: 2.5em; }
nav { font-size: .9em; margin: .5em 0 1em; }
nav a { margin-right: 1em; }
.question { font-style: italic; }
.banner { background: #fff4e5; border: 1px solid #f0b36b; padding: .5em .8em; border-radius: 4px; }
figure { margin: 1.5em 0; }
figure.headline { border-left: 4px solid #4c78a8; padding-left: .8em; margin-left: 0; }
.row { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 1.5em; margin: 1.5em 0; }
.row figure { margin: 0; }
.chart { overflow-x: auto; }
figcaption { font-size: .85em; color: #444; max-width: 60em; margin-top: .3em; }
figcaption .downloads a { margin-left: .4em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.rel { color: #666; font-size: .9em; }
.status-completed { color: #1a7f37; } .status-diverged { color: #b35900; }
.status-failed, .status-corrupt, .status-missing { color: #c62828; }
.error { font-family: monospace; min-width: 16em; max-width: 30em; word-break: break-word; }
td.files { white-space: nowrap; }
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


def build_report(
    results_dir: Path | str,
    out_html: Path | str,
    *,
    figures_dir: Path | str | None = None,
    runs_dir: Path | str | None = None,
    png: bool = True,
) -> Path:
    """Write the HTML report of `results_dir/{runs,metrics,quant}.parquet` to `out_html` (atomically) and
    every figure as SVG and, if `png`, PNG to `figures_dir` (default: `figures/` beside the page); return
    the page's path.

    `runs_dir` is where the run folders are, for the runs table's links (default: `results_dir/runs`, or
    the `runs/` beside `results_dir` when only that exists: the workflow's partial report reads tables
    from `results/partial/`, with the run folders in `results/runs/`).
    """
    results_dir, out_html = Path(results_dir), Path(out_html)
    figures_dir = Path(figures_dir) if figures_dir is not None else out_html.parent / "figures"
    runs_dir = Path(runs_dir) if runs_dir is not None else default_runs_dir(results_dir)
    runs_path = results_dir / "runs.parquet"
    runs = pd.read_parquet(runs_path)
    metrics = pd.read_parquet(results_dir / "metrics.parquet")
    quant = load_quant(results_dir)
    meta = read_metadata(runs_path)
    grid = grid_columns(runs, meta)
    study_list = studies(meta)

    formats = ("svg", "png") if png else ("svg",)
    href = _relative_href(figures_dir, out_html.parent)

    def links(stem: str) -> dict[str, str]:
        return {fmt: f"{href}/{urllib.parse.quote(stem)}.{fmt}" for fmt in formats}

    sections, figures = [], []
    slugs = _unique_slugs([name for name, _ in study_list])
    for index, ((name, study), slug) in enumerate(zip(study_list, slugs), start=1):
        section, study_figures = _study_section(index, name, slug, study, runs, metrics, quant, links)
        sections.append(section)
        figures += study_figures
    if not quant.empty:
        section, quant_figures = _quant_section(len(study_list) + 1, quant, grid, links)
        sections.append(section)
        figures += quant_figures
    export_figures(figures, figures_dir, png=png)
    body = [
        "<h1>Outlier features: ablation report</h1>",
        _partial_banner(runs),
        _nav_html(study_list, slugs, with_quant=not quant.empty),
        _summary_html(runs, study_list, slugs),
        _provenance_html(meta.get("provenance", {})),
        *sections,
        _runs_table_html(runs, grid, runs_dir, out_html.parent),
    ]
    atomic_write_text(out_html, _page("Outlier features: ablation report", "\n".join(b for b in body if b)))
    return out_html


def export_figures(figures: list[Figure], out_dir: Path | str, png: bool = True) -> dict[str, dict[str, Path]]:
    """Write each figure to `out_dir/<stem>.svg` (and `.png` if `png`) through vl-convert; remove the
    SVG and PNG files there that this set of figures does not produce (a study since removed, PNGs of an
    earlier build), so the folder always matches the page. Returns stem -> {format: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vl_version = _vl_version()
    written: dict[str, dict[str, Path]] = {}
    # One at a time: vl-convert renders serially anyway (a thread pool measured no faster).
    for figure in figures:
        paths = written[figure.stem] = {"svg": out_dir / f"{figure.stem}.svg"}
        with atomic_path(paths["svg"]) as tmp:
            tmp.write_text(vl_convert.vegalite_to_svg(figure.spec, vl_version=vl_version, allowed_base_urls=[]))
        if png:
            paths["png"] = out_dir / f"{figure.stem}.png"
            with atomic_path(paths["png"]) as tmp:
                tmp.write_bytes(vl_convert.vegalite_to_png(
                    figure.spec, vl_version=vl_version, scale=PNG_SCALE, allowed_base_urls=[]
                ))
    keep = {path.name for paths in written.values() for path in paths.values()}
    for stale in [*out_dir.glob("*.svg"), *out_dir.glob("*.png")]:
        if stale.name not in keep:
            stale.unlink()
    return written


def default_runs_dir(results_dir: Path) -> Path:
    """`results_dir/runs`, or `results_dir/../runs` where only that one exists (the partial report's tables)."""
    own, beside = results_dir / "runs", results_dir.parent / "runs"
    return beside if not own.is_dir() and beside.is_dir() else own


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


def run_labels(runs: pd.DataFrame, axes: list[str], empty: str | None = None) -> pd.Series:
    """One label per run from its values on `axes`, e.g. "block=op, lr=0.003"; without any of the axes
    in `runs`, `empty` (default: the run_id)."""
    axes = [a for a in axes if a in runs.columns]
    if not axes:
        return runs["run_id"].astype(str) if empty is None else pd.Series(empty, index=runs.index, dtype=str)
    labels = [", ".join(f"{a}={_format_value(row[a])}" for a in axes) for row in runs[axes].to_dict("records")]
    return pd.Series(labels, index=runs.index, dtype=str)


def sweep_axes(members: pd.DataFrame, axes: list[str]) -> list[str]:
    """The study's axes drawn as x of a sweep chart: numeric, with two or more values among its runs, not
    a replicate axis (seed: averaged over instead)."""
    out = []
    for axis in axes:
        if axis not in members.columns or axis in plots.REPLICATE_AXES:
            continue
        column = members[axis]
        if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
            if column.dropna().nunique() >= 2:
                out.append(axis)
    return out


def axis_values(members: pd.DataFrame, axis: str) -> list[str]:
    """The distinct values a study's runs take on `axis`, sorted (numbers numerically), formatted."""
    if axis not in members.columns:
        return []
    values = members[axis].dropna().unique().tolist()
    try:
        values = sorted(values)
    except TypeError:
        values = sorted(values, key=str)
    return [_format_value(v) for v in values]


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


Links = Callable[[str], dict[str, str]]


def _study_section(
    index: int,
    name: str,
    slug: str,
    study: dict,
    runs: pd.DataFrame,
    metrics: pd.DataFrame,
    quant: pd.DataFrame,
    links: Links,
) -> tuple[str, list[Figure]]:
    """The study's section (HTML, `id="study-<slug>"`) and its figures, headline first."""
    axes = [a for a in study.get("axes", []) if a in runs.columns]
    members = study_runs(runs, name)
    # Charts group a study's runs by its swept axes, seeds excepted: the seeds of a configuration share
    # its colour and panel, each still its own line (the tooltips give the seed).
    grouping = [a for a in axes if a not in plots.REPLICATE_AXES]
    labels = dict(zip(members["run_id"], run_labels(members, grouping, empty="all runs")))
    subset = metrics[metrics["run_id"].isin(labels)]
    subset = subset.assign(label=subset["run_id"].map(labels))

    kinds: list[tuple[str, Figure]] = []  # (figure slug, figure) in page order
    for axis in sweep_axes(members, axes):
        others = [a for a in grouping if a != axis]
        swept = members.assign(label=run_labels(members, others, empty="all runs"))
        log_x = plots.log_axis(axis, swept[axis])
        caption = SWEEP_CAPTION.format(axis=axis, scale=" (log scale)" if log_x else "", kurt=KURT_SHORT)
        figure_slug = f"sweep-{_slug(axis)}"
        kinds.append((figure_slug, Figure(f"{slug}-{figure_slug}", plots.sweep_lines(swept, axis, log_x), caption)))
    for figure_slug, chart in FIGURES:
        kinds.append((figure_slug, Figure(f"{slug}-{figure_slug}", chart(subset), CAPTIONS[figure_slug])))
    kinds[0] = (kinds[0][0], dataclasses.replace(kinds[0][1], headline=True))
    figures = [figure for _, figure in kinds]

    values = "; ".join(f"<code>{_esc(a)}</code> = {_esc(', '.join(axis_values(members, a)))}" for a in axes)
    parts = [
        f'<section id="study-{slug}">',
        f"<h2>{index}. {_esc(study.get('title') or name)}</h2>",
        f'<p class="question">{_esc(study.get("question", ""))}</p>',
        f"<p>Study <code>{_esc(name)}</code> sweeps {values or 'nothing'}; {len(members)} runs: "
        f"{_status_counts(members)}.</p>",
    ]
    if not members["status"].isin(DONE_STATUSES).any():
        parts.append('<p class="banner">No run of this study has finished yet: its charts say "no data".</p>')
    numbers = {figure.stem: f"{index}.{n}" for n, figure in enumerate(figures, start=1)}
    side_by_side = [figure for kind, figure in kinds if kind in SIDE_BY_SIDE]
    for kind, figure in kinds:
        if kind == SIDE_BY_SIDE[0]:  # the pair's first figure opens the row, with its partner
            parts.append('<div class="row">')
            parts += [_figure_html(f, numbers[f.stem], links(f.stem)) for f in side_by_side]
            parts.append("</div>")
        elif kind not in SIDE_BY_SIDE:
            parts.append(_figure_html(figure, numbers[figure.stem], links(figure.stem)))
    if not quant.empty:
        full_labels = dict(zip(members["run_id"], run_labels(members, axes)))
        in_study = quant[quant["run_id"].isin(full_labels)]
        if not in_study.empty:
            in_study = in_study.assign(configuration=in_study["run_id"].map(full_labels))
            parts.append(
                "<h3>int8 quantisation</h3>\n<p>Validation perplexity after quantisation of this study's runs "
                '(definitions in <a href="#int8">int8 quantisation</a>).</p>'
            )
            parts.append(_quant_table_html(quant_table(in_study, ["configuration"]), ["configuration"], in_study))
    parts.append("</section>")
    return "\n".join(parts), figures


def _quant_section(index: int, quant: pd.DataFrame, grid: list[str], links: Links) -> tuple[str, list[Figure]]:
    """The paper's int8 table over every run, then one degradation scatter per protocol."""
    runs = quant.drop_duplicates("run_id")
    shown = [
        c for c in grid
        if c in quant.columns and (c in QUANT_TABLE_COLUMNS or runs[c].nunique(dropna=False) > 1)
    ]
    parts = [
        '<section id="int8">',
        f"<h2>{index}. int8 quantisation</h2>",
        f"<p>{QUANT_EXPLANATION}</p>",
        _quant_table_html(quant_table(quant, shown), shown, quant),
    ]
    figures = []
    for number, protocol in enumerate(dict.fromkeys(p for p, _ in quant_protocol_bits(quant)), start=1):
        caption = QUANT_CAPTION.format(protocol=plots.PROTOCOL_NAMES.get(protocol, protocol))
        figure = Figure(f"int8-degradation-{_slug(protocol)}", plots.quant_degradation_scatter(quant, protocol), caption)
        figures.append(figure)
        parts.append(_figure_html(figure, f"{index}.{number}", links(figure.stem)))
    parts.append("</section>")
    return "\n".join(parts), figures


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


def _figure_html(figure: Figure, number: str, links: dict[str, str]) -> str:
    """The figure: its chart's div, its Vega-Lite spec as a JSON block the loader script reads, and a
    caption with links to the exported files."""
    # "<" escaped as \u003c is still the same JSON, and no "</script>" in a value can end the block early.
    payload = json.dumps(figure.spec, allow_nan=False).replace("<", "\\u003c")
    div_id = f"fig-{figure.stem}"
    downloads = " ".join(f'<a href="{_esc(href)}">{fmt.upper()}</a>' for fmt, href in links.items())
    label = f"Figure {number}" + (" (headline)" if figure.headline else "")
    opening = '<figure class="headline">' if figure.headline else "<figure>"
    return (
        f"{opening}\n"
        f'<div class="chart" id="{div_id}"></div>\n'
        f'<script type="application/json" class="chart-spec" data-target="{div_id}">{payload}</script>\n'
        f"<figcaption><b>{label}.</b> {_esc(figure.caption)} "
        f'<span class="downloads">Download:{" " + downloads if downloads else ""}</span></figcaption>\n'
        "</figure>"
    )


def _relative_href(target: Path, start: Path) -> str:
    """A relative URL from the folder `start` to `target` (both resolved), e.g. "../results/runs/x"."""
    rel = os.path.relpath(Path(target).resolve(), Path(start).resolve())
    return urllib.parse.quote(Path(rel).as_posix())


def _partial_banner(runs: pd.DataFrame) -> str:
    pending = runs[~runs["status"].isin(DONE_STATUSES)]
    if pending.empty:
        return ""
    return (
        f'<p class="banner"><b>Partial results:</b> {len(pending)} of {len(runs)} runs have no results '
        f"({_status_counts(pending)}); the figures show the runs that finished. Failed and corrupt runs list their "
        'error in the <a href="#runs">runs table</a>.</p>'
    )


def _nav_html(study_list: list[tuple[str, dict]], slugs: list[str], with_quant: bool) -> str:
    links = ['<a href="#summary">Summary</a>', '<a href="#provenance">Provenance</a>']
    links += [f'<a href="#study-{slug}">{_esc(study.get("title") or name)}</a>'
              for (name, study), slug in zip(study_list, slugs)]
    if with_quant:
        links.append('<a href="#int8">int8 quantisation</a>')
    links.append('<a href="#runs">Runs</a>')
    return "<nav>" + "\n".join(links) + "</nav>"


def _summary_html(runs: pd.DataFrame, study_list: list[tuple[str, dict]], slugs: list[str]) -> str:
    """Run counts by status, wall time, and the grid: each study, its question, swept axes and values."""
    wall = pd.to_numeric(runs["wall_s"], errors="coerce")
    wall_text = f"Wall time: {_duration(wall.sum())} summed over runs"
    if wall.notna().any():
        wall_text += f", longest run {_duration(wall.max())}"
    rows = []
    for (name, study), slug in zip(study_list, slugs):
        members = study_runs(runs, name)
        axes = [a for a in study.get("axes", []) if a in runs.columns]
        values = "<br>".join(f"<code>{_esc(a)}</code>: {_esc(', '.join(axis_values(members, a)))}" for a in axes)
        rows.append(
            f'<tr><td><a href="#study-{slug}">{_esc(study.get("title") or name)}</a><br>'
            f"<code>{_esc(name)}</code></td><td class=\"question\">{_esc(study.get('question', ''))}</td>"
            f"<td>{values or '-'}</td><td class=\"num\">{len(members)}</td><td>{_status_counts(members)}</td></tr>"
        )
    grid = (
        '<table class="grid">\n<tr><th>study</th><th>question</th><th>swept axes: values</th><th>runs</th>'
        "<th>status</th></tr>\n" + "\n".join(rows) + "\n</table>"
    )
    return (
        '<h2 id="summary">Summary</h2>\n'
        f"<p>{len(runs)} runs: {_status_counts(runs)}. {wall_text}.</p>\n"
        f"{grid}\n"
        "<p>Kurtosis (Kurt) is the paper's uncentred kurtosis of the neuron RMS values (1 = all neurons equal); "
        "the centred variant of the public code is logged too but not plotted. A run shared by several "
        "studies is trained once and shown in each.</p>"
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
        ("date (results aggregated)", prov.get("date") or "unknown"),
        ("report built", datetime.now(timezone.utc).isoformat(timespec="seconds")),
    ]
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in items)
    return f'<h2 id="provenance">Provenance</h2>\n<table class="provenance">{rows}</table>'


def _status_counts(runs: pd.DataFrame) -> str:
    counts = runs["status"].fillna("missing").value_counts()
    order = [s for s in STATUS_ORDER if s in counts.index] + sorted(s for s in counts.index if s not in STATUS_ORDER)
    return ", ".join(f"{counts[status]} {status}" for status in order) or "no runs"


def _runs_table_html(runs: pd.DataFrame, grid: list[str], runs_dir: Path, page_dir: Path) -> str:
    header = [
        "run_id", *grid, "studies", "status", "final val loss", "final mean kurtosis", "peak kurtosis", "tokens/s",
        "files", "error",
    ]
    rows = [_run_row(run, grid, runs_dir, page_dir) for run in runs.to_dict("records")]
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    return (
        '<section id="runs">\n<h2>Runs</h2>\n'
        "<p>Every planned run. final mean kurtosis: Kurt averaged over layers at the last logged step; peak "
        "kurtosis: its maximum over steps and layers. <i>files</i> links the run folder (config, metrics, "
        "summary, logs), relative to this page.</p>\n"
        f'<table class="runs">\n<tr>{head}</tr>\n' + "\n".join(rows) + "\n</table>\n</section>"
    )


def _run_row(run: dict, grid: list[str], runs_dir: Path, page_dir: Path) -> str:
    status = str(run.get("status"))
    folder = runs_dir / str(run["run_id"])
    files = f'<a href="{_relative_href(folder, page_dir)}/">run folder</a>' if folder.is_dir() else "-"
    cells = [f"<td>{_esc(run['run_id'])}</td>"]
    cells += [f"<td>{_esc(_format_value(run.get(c)))}</td>" for c in grid]
    cells.append(f"<td>{_esc(', '.join(_as_list(run.get('studies'))))}</td>")
    cells.append(f'<td class="status-{_slug(status)}">{_esc(status)}</td>')
    cells.append(f'<td class="num">{_number(run.get("final_val_loss"), ".4f")}</td>')
    cells.append(f'<td class="num">{_number(run.get("final_mean_kurtosis"), ".4g")}</td>')
    cells.append(f'<td class="num">{_number(run.get("peak_kurtosis"), ".4g")}</td>')
    cells.append(f'<td class="num">{_number(run.get("tokens_per_s"), ",.0f")}</td>')
    cells.append(f'<td class="files">{files}</td>')
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


def _vl_version() -> str:
    """The Vega-Lite version Altair writes specs for, as "major.minor" (what vl-convert takes)."""
    return ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])


def _vega_bundle() -> str:
    """vega + vega-lite + vega-embed, for the Vega-Lite version Altair writes specs for, as one classic script."""
    bundle = vl_convert.javascript_bundle(vl_version=_vl_version())
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


def _duration(seconds: float) -> str:
    """A duration as "2.5 h", "12 min" or "40 s" ("-" when unknown)."""
    if not math.isfinite(seconds):
        return "-"
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def _unique_slugs(names: list[str]) -> list[str]:
    """`_slug` of each name, suffixed with -2, -3, ... where two names share one (and never "int8", the
    quantisation section's)."""
    seen: set[str] = {"int8"}
    out = []
    for name in names:
        base = slug = _slug(name)
        n = 1
        while slug in seen:
            n += 1
            slug = f"{base}-{n}"
        seen.add(slug)
        out.append(slug)
    return out
