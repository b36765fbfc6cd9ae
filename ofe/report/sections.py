"""The report's sections as data for its templates: the front page (partial-results banner, summary of
the grid, provenance) and one section per study, whose figures come first.

A study's section: a headline figure that answers the study's question first (for a study that sweeps a
numeric axis, peak and final mean kurtosis against it, seeds averaged; otherwise per-layer kurtosis over
training, one panel per configuration, as in the paper's figures 2 and 4), then kurtosis over training,
kurtosis beside signal propagation per layer, max-median ratio, where the study's metrics carry them the
attention-sink rate beside the massive ratio per layer and over training (`METRIC_FIGURES`: results
from before these metrics render as they did), loss curves (a configuration with several seeds: the mean
over them with a min-max band), a table by configuration (mean ± std over seeds) where some configuration
has several seeds, and the study's int8 tables when quantisation results exist.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial

import altair as alt
import pandas as pd

from ofe.report import plots
from ofe.report.htmlparts import Figure, Links, as_list, figure_context, fmt_value, to_slug
from ofe.report.int8 import config_table, config_table_context, quant_table, quant_table_context
from ofe.report.plots.seeds import seeds_text
from ofe.report.tables import configuration_table

# Width of each of the two per-layer charts shown side by side (kurtosis beside signal propagation).
PAIR_WIDTH = 330

# (slug, chart function) of the figures every study section shows, in page order; a study that sweeps a
# numeric axis shows its sweep charts (`sweep-<axis>`) first, as its headline.
FIGURES: tuple[tuple[str, Callable[[pd.DataFrame], alt.TopLevelMixin]], ...] = (
    ("kurtosis-over-steps", plots.kurtosis_over_steps),
    ("final-layer-kurtosis", partial(plots.final_layer_kurtosis, width=PAIR_WIDTH)),
    ("final-layer-token-correlation", partial(plots.final_layer_token_correlation, width=PAIR_WIDTH)),
    ("final-layer-mmr", plots.final_layer_mmr),
    ("loss-curves", plots.loss_curves),
)
# Figures of metrics that runs log from issue 23 on: (slug, chart function, the metric a study's table
# must carry for the figure to show), placed before the loss curves.
METRIC_FIGURES: tuple[tuple[str, Callable[[pd.DataFrame], alt.TopLevelMixin], str], ...] = (
    ("final-layer-sink-rate", partial(plots.final_layer_sink_rate, width=PAIR_WIDTH), "sink_rate"),
    ("final-layer-massive-ratio", partial(plots.final_layer_massive_ratio, width=PAIR_WIDTH), "massive_ratio"),
    ("sink-rate-over-steps", partial(plots.sink_rate_over_steps, width=PAIR_WIDTH), "sink_rate"),
    ("massive-ratio-over-steps", partial(plots.massive_ratio_over_steps, width=PAIR_WIDTH), "massive_ratio"),
)
METRIC_FIGURES_BEFORE = "loss-curves"
# Figures laid out side by side, each pair in one row that wraps on a narrow window (a pair one of whose
# figures a study lacks: a row of one).
SIDE_BY_SIDE = (
    ("final-layer-kurtosis", "final-layer-token-correlation"),
    ("final-layer-sink-rate", "final-layer-massive-ratio"),
    ("sink-rate-over-steps", "massive-ratio-over-steps"),
)

# What each figure plots and which metric definition it uses, for its caption (the full definitions are
# in the chart's subtitle).
KURT_SHORT = "Kurt = the paper's uncentred kurtosis of the neuron RMS values (1 = no outlier features)"
CAPTIONS = {
    "kurtosis-over-steps": f"Kurt per layer over training, one panel per configuration, log scale; {KURT_SHORT}.",
    "final-layer-kurtosis": f"Kurt per layer at each run's last logged step, log scale; {KURT_SHORT}.",
    "final-layer-token-correlation": (
        "Signal propagation per layer at each run's last logged step: average token correlation, the mean "
        "off-diagonal entry of the token Gram matrix X X^T / d of the width-centred activations divided by "
        "their global RMS (near 1 = rank collapse)."
    ),
    "final-layer-mmr": (
        "Max-median ratio per layer at each run's last logged step, log scale: mean over tokens of "
        "max_j |x_j| / median_j |x_j|."
    ),
    "final-layer-sink-rate": (
        "Attention-sink rate per layer at each run's last logged step: the share of heads whose mean attention "
        "weight on the first token exceeds 0.3 (Gu et al. 2024), over the probe batch's sequences."
    ),
    "final-layer-massive-ratio": (
        "Massive activations per layer at each run's last logged step, log scale: top-1 |h| of the residual "
        "stream over its median |h| (Sun et al. 2024); layer L is the last block's output, before any final norm."
    ),
    "sink-rate-over-steps": (
        "Attention-sink rate averaged over layers against step, colour = configuration: Gu et al.'s sink rate "
        "of the whole model, the share of (sequence, layer, head) triples above 0.3."
    ),
    "massive-ratio-over-steps": (
        "Massive ratio (top-1 |h| / median |h|) at the layer where it is largest against step, log scale, "
        "colour = configuration: a massive activation sits in a few layers, which a mean would dilute."
    ),
    "loss-curves": (
        "Training loss (logged batches) and validation loss against step, log scale, colour = configuration."
    ),
}
SWEEP_CAPTION = (
    "Peak Kurt (maximum over steps and layers) and final mean Kurt (averaged over layers at the last "
    "logged step) against {axis}{scale}; lines through the mean over seeds, points for each run; {kurt}."
)

# Added to every figure's caption in a study where some configuration has several seeds.
SEEDS_CAPTION = " Several seeds per configuration: line = their mean, band = min-max over {n} seeds."

STATUS_ORDER = ("completed", "diverged", "failed", "corrupt", "missing")
DONE_STATUSES = ("completed", "diverged")  # runs that finished and have results


def study_section(
    index: int,
    name: str,
    slug: str,
    study: dict,
    runs: pd.DataFrame,
    metrics: pd.DataFrame,
    quant: pd.DataFrame,
    links: Links,
) -> tuple[dict, list[Figure]]:
    """What study.html.j2 writes for one study (also the study's row of the summary), and its figures,
    headline first."""
    axes = [a for a in study.get("axes", []) if a in runs.columns]
    members = study_runs(runs, name)
    # Charts group a study's runs by its swept axes, seeds excepted: the seeds of a configuration share
    # its colour and panel.
    grouping = [a for a in axes if a not in plots.REPLICATE_AXES]
    config_labels = run_labels(members, grouping, empty="all runs")
    labels = dict(zip(members["run_id"], config_labels))
    subset = metrics[metrics["run_id"].isin(labels)]
    subset = subset.assign(label=subset["run_id"].map(labels))
    # Several seeds of a configuration are drawn as their mean and a min-max band (plots_seeds); the
    # captions say over how many, counting the runs that have results.
    finished = members["status"].isin(DONE_STATUSES)
    n_seeds = seeds_text(config_labels[finished].value_counts())
    seeds_caption = SEEDS_CAPTION.format(n=n_seeds) if n_seeds else ""

    kinds: list[tuple[str, Figure]] = []  # (figure slug, figure) in page order
    for axis in sweep_axes(members, axes):
        others = [a for a in grouping if a != axis]
        swept = members.assign(label=run_labels(members, others, empty="all runs"))
        log_x = plots.log_axis(axis, swept[axis])
        caption = SWEEP_CAPTION.format(axis=axis, scale=" (log scale)" if log_x else "", kurt=KURT_SHORT)
        figure_slug = f"sweep-{to_slug(axis)}"
        # Points stay beside the band: their shape marks a diverged run, which a band cannot.
        chart = plots.sweep_lines(swept, axis, log_x, band=True, points=True)
        kinds.append((figure_slug, Figure(f"{slug}-{figure_slug}", chart, caption + seeds_caption)))
    for figure_slug, chart in study_figures(subset):
        caption = CAPTIONS[figure_slug] + seeds_caption
        kinds.append((figure_slug, Figure(f"{slug}-{figure_slug}", chart(subset), caption)))
    kinds[0] = (kinds[0][0], dataclasses.replace(kinds[0][1], headline=True))
    figures = [figure for _, figure in kinds]

    contexts = {f.stem: figure_context(f, f"{index}.{n}", links(f.stem)) for n, f in enumerate(figures, start=1)}
    items, placed = [], set()
    for kind, figure in kinds:
        pair = next((p for p in SIDE_BY_SIDE if kind in p), None)
        if pair is None:
            items.append({"row": None, "figure": contexts[figure.stem]})
        elif pair not in placed:  # the pair's first figure opens the row, with its partner
            placed.add(pair)
            items.append({"row": [contexts[f.stem] for k, f in kinds if k in pair]})

    several_seeds = bool(len(members)) and int(config_labels.value_counts().max()) > 1
    int8, int8_by_config = _int8_tables(members, axes, labels, quant, several_seeds)
    context = {
        "kind": "runs",  # the page includes study.html.j2 (checkpoint studies: checkpoints.html.j2)
        "number": index,
        "slug": slug,
        "name": name,
        "title": study.get("title") or name,
        "question": study.get("question", ""),
        "axes": [{"name": a, "levels": ", ".join(axis_values(members, a))} for a in axes],
        "runs": len(members),
        "status": status_counts(members),
        "finished": bool(members["status"].isin(DONE_STATUSES).any()),
        "figures": items,
        "by_config": configuration_table(members, config_labels) if several_seeds else None,
        "int8": int8,
        "int8_by_config": int8_by_config,
    }
    return context, figures


def study_figures(metrics: pd.DataFrame) -> list[tuple[str, Callable[[pd.DataFrame], alt.TopLevelMixin]]]:
    """(slug, chart function) of a study's figures in page order: `FIGURES`, with the `METRIC_FIGURES`
    whose metric `metrics` (the study's rows) carries before the loss curves."""
    carried = set(metrics["metric"].unique()) if "metric" in metrics.columns else set()
    extra = [(slug, chart) for slug, chart, metric in METRIC_FIGURES if metric in carried]
    at = [slug for slug, _ in FIGURES].index(METRIC_FIGURES_BEFORE)
    return [*FIGURES[:at], *extra, *FIGURES[at:]]


def _int8_tables(
    members: pd.DataFrame, axes: list[str], labels: dict[str, str], quant: pd.DataFrame, several_seeds: bool
) -> tuple[dict | None, dict | None]:
    """The study's int8 table per run (configuration = every swept axis, seed included) and, where some
    configuration has several seeds, by configuration (`labels`: seeds excepted); None where the study
    has no quantisation results."""
    full_labels = dict(zip(members["run_id"], run_labels(members, axes)))
    in_study = quant[quant["run_id"].isin(full_labels)] if not quant.empty else quant
    if in_study.empty:
        return None, None
    per_run = in_study.assign(configuration=in_study["run_id"].map(full_labels))
    table = quant_table_context(quant_table(per_run, ["configuration"]), ["configuration"], per_run)
    if not several_seeds:
        return table, None
    by_config = in_study.assign(configuration=in_study["run_id"].map(labels))
    return table, config_table_context(config_table(by_config, ["configuration"]), ["configuration"], by_config)


def pending_runs(runs: pd.DataFrame) -> dict | None:
    """How many runs have no results and why, for the partial-results banner (None when every run finished)."""
    pending = runs[~runs["status"].isin(DONE_STATUSES)]
    return None if pending.empty else {"count": len(pending), "status": status_counts(pending)}


def summary(runs: pd.DataFrame) -> dict:
    """Run counts by status and wall time, for the front page."""
    wall = pd.to_numeric(runs["wall_s"], errors="coerce")
    wall_text = f"Wall time: {duration(wall.sum())} summed over runs"
    if wall.notna().any():
        wall_text += f", longest run {duration(wall.max())}"
    return {"runs": len(runs), "status": status_counts(runs), "wall": wall_text}


def provenance(prov: dict) -> list[dict]:
    """(name, value) rows of the provenance table: git revision and state, python, libraries, machine,
    when the results were aggregated and when this report was built."""
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
    return [{"name": k, "value": str(v)} for k, v in items]


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


def status_counts(runs: pd.DataFrame) -> str:
    """e.g. "4 completed, 1 diverged, 1 missing": finished runs first, missing last."""
    counts = runs["status"].fillna("missing").value_counts()
    order = [s for s in STATUS_ORDER if s in counts.index] + sorted(s for s in counts.index if s not in STATUS_ORDER)
    return ", ".join(f"{counts[status]} {status}" for status in order) or "no runs"


def duration(seconds: float) -> str:
    """A duration as "2.5 h", "12 min" or "40 s" ("-" when unknown)."""
    if not math.isfinite(seconds):
        return "-"
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def unique_slugs(names: list[str]) -> list[str]:
    """`to_slug` of each name, suffixed with -2, -3, ... where two names share one (and never "int8", the
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
