"""One self-contained HTML report of an ablation, as a researcher reads it.

- Front page: the grid (each study, its question, swept axes and their values, run counts by status),
  total wall time, a banner while results are partial (runs failed, corrupt or missing), and provenance.
- One section per study, headline figure first (`sections`); a checkpoint study (pretrained
  checkpoints inspected, not a training grid) gets its own kind of section (`ckpt`), in the
  config's order among the others.
- int8 quantisation over every run (when `quant.parquet` has rows; `int8`), then the runs table:
  configuration, status, final loss, kurtosis, the last line of a failed run's error (a corrupt run's
  reason), a relative link to the run folder (`tables`).

This module reads the tables, has the section modules prepare plain data, and renders the Jinja2
templates of `ofe/report/templates/` (page.html.j2 and the templates it includes) into one page.

The page opens offline (also from a file:// URL): the Vega, Vega-Lite and vega-embed JavaScript is
inlined once (the bundle `vl_convert.javascript_bundle()` builds, a classic script that sets
`window.vegaEmbed`), each chart's Vega-Lite spec sits in a `<script type="application/json">` block
beside its `<div>`, and a final script hands every spec to `vegaEmbed`. Every figure is also exported
beside the page, as `figures/<study>-<figure>.svg` (and `.png` on request: PNG rendering is the slow
part), linked from its caption.

Partial results render too: a study whose runs are all missing gets its sections with "no data" charts.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import altair as alt
import pandas as pd
import vl_convert

from ofe.io import atomic_path, atomic_write_text, read_metadata
from ofe.plan.grid import default_figures_dir
from ofe.report.ckpt import checkpoint_section, checkpoint_summary, load_checkpoint_tables, pending_checkpoints
from ofe.report.htmlparts import Figure, relative_href, render
from ofe.report.int8 import int8_context, load_quant
from ofe.report.sections import pending_runs, provenance, study_section, summary, unique_slugs
from ofe.report.tables import runs_table

TITLE = "Outlier features: ablation report"
KNOWN_GRID_COLUMNS = ("block", "scale", "optimizer", "beta", "lr", "seed")

# PNG exports at twice the chart's CSS size, crisp on a high-density screen or a slide.
PNG_SCALE = 2.0

# vega-embed options: SVG keeps text crisp; the "open in editor" action needs the network, so it is off.
EMBED_OPTIONS = {"renderer": "svg", "actions": {"export": True, "source": True, "compiled": False, "editor": False}}


def build_report(
    results_dir: Path | str,
    out_html: Path | str,
    *,
    figures_dir: Path | str | None = None,
    runs_dir: Path | str | None = None,
    png: bool = True,
) -> Path:
    """Write the HTML report of `results_dir/{runs,metrics,quant}.parquet` (and of the checkpoint tables
    where they exist: `report_ckpt.TABLE_FILES`) to `out_html` (atomically) and
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
    checkpoints = load_checkpoint_tables(results_dir)
    meta = read_metadata(runs_path)
    grid = grid_columns(runs, meta)
    study_list = studies(meta)

    formats = ("svg", "png") if png else ("svg",)
    href = relative_href(figures_dir, out_html.parent)

    def links(stem: str) -> dict[str, str]:
        return {fmt: f"{href}/{urllib.parse.quote(stem)}.{fmt}" for fmt in formats}

    sections, figures = [], []
    slugs = unique_slugs([name for name, _ in study_list])
    for index, ((name, study), slug) in enumerate(zip(study_list, slugs), start=1):
        if study.get("kind") == "checkpoints":
            section, study_figures = checkpoint_section(index, name, slug, study, checkpoints, links)
        else:  # "runs", or no kind: tables from before checkpoint studies existed
            section, study_figures = study_section(index, name, slug, study, runs, metrics, quant, links)
        sections.append(section)
        figures += study_figures
    has_checkpoints = any(study.get("kind") == "checkpoints" for _, study in study_list)
    int8 = None
    if not quant.empty:
        int8, quant_figures = int8_context(len(study_list) + 1, quant, grid, links)
        figures += quant_figures
    export_figures(figures, figures_dir, png=png)
    page = render(
        "page.html.j2",
        title=TITLE,
        vega_bundle=vl_convert.javascript_bundle(vl_version=_vl_version()),
        embed_options=EMBED_OPTIONS,
        pending=pending_runs(runs),
        pending_checkpoints=pending_checkpoints(checkpoints.checkpoints),
        summary=summary(runs),
        checkpoints=checkpoint_summary(checkpoints.checkpoints),
        provenance=provenance(meta.get("provenance", {})),
        studies=sections,
        int8=int8,
        # A config of checkpoint studies alone has no runs: no empty runs table.
        runs_table=None if runs.empty and has_checkpoints else runs_table(runs, grid, runs_dir, out_html.parent),
    )
    atomic_write_text(out_html, page)
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


def _vl_version() -> str:
    """The Vega-Lite version Altair writes specs for, as "major.minor" (what vl-convert takes)."""
    return ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
