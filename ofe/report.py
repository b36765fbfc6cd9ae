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
from ofe.report_int8 import int8_section, load_quant, quant_table, quant_table_html
from ofe.grid import default_figures_dir
from ofe.htmlparts import Figure, Links, as_list, esc, figure_html, fmt_number, fmt_value, to_slug
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



def build_report(
    results_dir: Path | str,
    out_html: Path | str,
    *,
    figures_dir: Path | str | None = None,
    runs_dir: Path | str | None = None,
    png: bool = True,
) -> Path:
    """Write the HTML report of `results_dir/{runs,metrics,quant}.parquet` to `out_html` (atomically) and
    every figure as SVG and, if `png`, PNG to `figures_dir` (default: `default_figures_dir`); return
    the page's path.

    `runs_dir` is where the run folders are, for the runs table's links (default: `results_dir/runs`, or
    the `runs/` beside `results_dir` when only that exists: the workflow's partial report reads tables
    from `results/partial/`, with the run folders in `results/runs/`).
    """
    results_dir, out_html = Path(results_dir), Path(out_html)
    figures_dir = Path(figures_dir) if figures_dir is not None else default_figures_dir(out_html)
    runs_dir = Path(runs_dir) if runs_dir is not None else default_runs_dir(results_dir)
    runs_path = results_dir / "runs.parquet"
    runs = pd.read_parquet(runs_path)
    metrics = pd.read_parquet(results_dir / "metrics.parquet")
    quant = load_quant(results_dir, runs)
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
        section, quant_figures = int8_section(len(study_list) + 1, quant, grid, links)
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
    labels = [", ".join(f"{a}={fmt_value(row[a])}" for a in axes) for row in runs[axes].to_dict("records")]
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
    return [fmt_value(v) for v in values]


def study_runs(runs: pd.DataFrame, name: str) -> pd.DataFrame:
    """The runs whose `studies` list contains `name`."""
    return runs[runs["studies"].map(lambda names: name in as_list(names))]


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
        figure_slug = f"sweep-{to_slug(axis)}"
        kinds.append((figure_slug, Figure(f"{slug}-{figure_slug}", plots.sweep_lines(swept, axis, log_x), caption)))
    for figure_slug, chart in FIGURES:
        kinds.append((figure_slug, Figure(f"{slug}-{figure_slug}", chart(subset), CAPTIONS[figure_slug])))
    kinds[0] = (kinds[0][0], dataclasses.replace(kinds[0][1], headline=True))
    figures = [figure for _, figure in kinds]

    values = "; ".join(f"<code>{esc(a)}</code> = {esc(', '.join(axis_values(members, a)))}" for a in axes)
    parts = [
        f'<section id="study-{slug}">',
        f"<h2>{index}. {esc(study.get('title') or name)}</h2>",
        f'<p class="question">{esc(study.get("question", ""))}</p>',
        f"<p>Study <code>{esc(name)}</code> sweeps {values or 'nothing'}; {len(members)} runs: "
        f"{_status_counts(members)}.</p>",
    ]
    if not members["status"].isin(DONE_STATUSES).any():
        parts.append('<p class="banner">No run of this study has finished yet: its charts say "no data".</p>')
    numbers = {figure.stem: f"{index}.{n}" for n, figure in enumerate(figures, start=1)}
    side_by_side = [figure for kind, figure in kinds if kind in SIDE_BY_SIDE]
    for kind, figure in kinds:
        if kind == SIDE_BY_SIDE[0]:  # the pair's first figure opens the row, with its partner
            parts.append('<div class="row">')
            parts += [figure_html(f, numbers[f.stem], links(f.stem)) for f in side_by_side]
            parts.append("</div>")
        elif kind not in SIDE_BY_SIDE:
            parts.append(figure_html(figure, numbers[figure.stem], links(figure.stem)))
    if not quant.empty:
        full_labels = dict(zip(members["run_id"], run_labels(members, axes)))
        in_study = quant[quant["run_id"].isin(full_labels)]
        if not in_study.empty:
            in_study = in_study.assign(configuration=in_study["run_id"].map(full_labels))
            parts.append(
                "<h3>int8 quantisation</h3>\n<p>Validation perplexity after quantisation of this study's runs "
                '(definitions in <a href="#int8">int8 quantisation</a>).</p>'
            )
            parts.append(quant_table_html(quant_table(in_study, ["configuration"]), ["configuration"], in_study))
    parts.append("</section>")
    return "\n".join(parts), figures


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
    links += [f'<a href="#study-{slug}">{esc(study.get("title") or name)}</a>'
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
        values = "<br>".join(f"<code>{esc(a)}</code>: {esc(', '.join(axis_values(members, a)))}" for a in axes)
        rows.append(
            f'<tr><td><a href="#study-{slug}">{esc(study.get("title") or name)}</a><br>'
            f"<code>{esc(name)}</code></td><td class=\"question\">{esc(study.get('question', ''))}</td>"
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
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in items)
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
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
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
    cells = [f"<td>{esc(run['run_id'])}</td>"]
    cells += [f"<td>{esc(fmt_value(run.get(c)))}</td>" for c in grid]
    cells.append(f"<td>{esc(', '.join(as_list(run.get('studies'))))}</td>")
    cells.append(f'<td class="status-{to_slug(status)}">{esc(status)}</td>')
    cells.append(f'<td class="num">{fmt_number(run.get("final_val_loss"), ".4f")}</td>')
    cells.append(f'<td class="num">{fmt_number(run.get("final_mean_kurtosis"), ".4g")}</td>')
    cells.append(f'<td class="num">{fmt_number(run.get("peak_kurtosis"), ".4g")}</td>')
    cells.append(f'<td class="num">{fmt_number(run.get("tokens_per_s"), ",.0f")}</td>')
    cells.append(f'<td class="files">{files}</td>')
    cells.append(f'<td class="error">{esc(_last_line(run.get("error")))}</td>')
    return "<tr>" + "".join(cells) + "</tr>"


def _page(title: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{esc(title)}</title>
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


def _last_line(error: object) -> str:
    if not isinstance(error, str) or not error.strip():
        return ""
    return error.strip().splitlines()[-1]


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
        base = slug = to_slug(name)
        n = 1
        while slug in seen:
            n += 1
            slug = f"{base}-{n}"
        seen.add(slug)
        out.append(slug)
    return out
