"""Kurtosis against a swept numeric axis (learning rate, epsilon, beta, ...): the headline figure of a
study that sweeps one. Reads the runs table (`runs.parquet`, one row per run), not the metrics."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from ofe.report.plots.common import (
    FADED, KURTOSIS_DEF, MEAN_KURTOSIS_DEF, PANEL_HEIGHT, PANEL_WIDTH, chart_title, label_color, no_data, tooltips,
    vl_field,
)
from ofe.report.plots.seeds import BAND_LEGEND, band_opacity, seeds_text

# Columns of the runs table (runs.parquet) that describe a measurement rather than a run's configuration.
RUN_MEASURE_COLUMNS = frozenset(
    {"run_id", "label", "studies", "status", "error", "peak_kurtosis", "final_mean_kurtosis", "final_train_loss",
     "final_val_loss", "tokens_per_s", "wall_s", "steps_done", "measure", "value", "kind", "n"}
)
PEAK_KURTOSIS_DEF = (
    "peak Kurt = maximum of Kurt over logged steps and layers (residual stream entering each block and "
    "the unembedding input; non-finite values ignored)"
)
# (runs-table column, name in the chart) of the sweep charts' panels, in panel order.
SWEEP_MEASURES = (("peak_kurtosis", "peak Kurt"), ("final_mean_kurtosis", "final mean Kurt"))
# Swept axes drawn on a log scale: by the last part of their name (lr, optim.eps, ...), or when their
# positive values span two orders of magnitude or more.
LOG_AXES = frozenset({"lr", "eps", "weight_decay"})


def sweep_lines(
    runs: pd.DataFrame, x: str, log_x: bool | None = None, *, band: bool = False, points: bool = True
) -> alt.FacetChart | alt.Chart:
    """Peak and final mean kurtosis against a swept axis `x` (one panel each, log y): one line per
    `label` (the study's other swept axes) through the mean over the runs sharing a value (the seeds);
    with `band`, where some value has several runs, a band from their minimum to their maximum (the
    report draws it); with `points`, every run as a point (shape = status, so a diverged run shows).

    `runs` is runs.parquet's rows of one study with a `label` column (without one, all runs are one
    series). Runs without a finite, positive value (failed, missing) are left out of that panel.
    `log_x` defaults to `log_axis(x, values)`.
    """
    notes = [PEAK_KURTOSIS_DEF, f"final mean Kurt = {MEAN_KURTOSIS_DEF}; {KURTOSIS_DEF}"]
    title_text = f"Kurtosis against {x}"
    runs_points = sweep_points(runs, x)
    if runs_points.empty:
        return no_data(chart_title(title_text, notes))
    if log_x is None:
        log_x = log_axis(x, runs_points[x])
    grouped = runs_points.groupby([x, "label", "measure"], sort=False, dropna=False)["value"]
    seeds = band and int(grouped.size().max()) > 1
    stats = ["mean", "size", "min", "max"] if seeds else ["mean", "size"]
    means = grouped.agg(stats).reset_index().rename(columns={"mean": "value", "size": "n"}).assign(kind="mean")
    lines_note = "lines: mean over the runs at each value (seeds)"
    if seeds:
        lines_note += f", band = min-max over {seeds_text(means['n'])} seeds"
    if points:
        lines_note += "; points: the individual runs, shape = status"
    notes.append(f"{lines_note}; x {'log' if log_x else 'linear'} scale, y log scale")
    notes.append("colour = the study's other swept axes; click a legend entry to highlight it")
    df = pd.concat([runs_points.assign(kind="run"), means], ignore_index=True)
    x_field = vl_field(x)
    pick = alt.selection_point(fields=["label"], bind="legend")
    base = alt.Chart().encode(
        x=alt.X(
            f"{x_field}:Q",
            title=x,
            # Padding keeps the points at the first and last value clear of the panel's edges.
            scale=alt.Scale(type="log", nice=False, padding=14) if log_x
            else alt.Scale(zero=False, nice=False, padding=14),
            axis=alt.Axis(format="~g", values=sorted(runs_points[x].unique().tolist())),
        ),
        y=alt.Y("value:Q", title="Kurt", scale=alt.Scale(type="log")),
        color=label_color(BAND_LEGEND if seeds else None),
        opacity=alt.condition(pick, alt.value(1.0), alt.value(FADED)),
    )
    spread = [alt.Tooltip("min:Q", title="min", format=".4~g"), alt.Tooltip("max:Q", title="max", format=".4~g")]
    line = (
        base.transform_filter(alt.datum.kind == "mean")
        .mark_line(strokeWidth=2)
        .encode(
            tooltip=[
                alt.Tooltip("label:N", title="label"),
                alt.Tooltip(f"{x_field}:Q", title=x, format="~g"),
                alt.Tooltip("measure:N", title="measure"),
                alt.Tooltip("value:Q", title="mean", format=".4~g"),
                *(spread if seeds else []),
                alt.Tooltip("n:Q", title="runs"),
            ]
        )
        .add_params(pick)
    )
    layers = [line]
    if seeds:  # under the line
        layers.insert(0, base.transform_filter(alt.datum.kind == "mean").mark_area().encode(
            # stack=None: an area with a colour is stacked by default; each band sits at its own values.
            y=alt.Y("min:Q", title="Kurt", scale=alt.Scale(type="log"), stack=None),
            y2="max:Q",
            opacity=band_opacity(pick),
        ))
    if points:
        layers.append(
            base.transform_filter(alt.datum.kind == "run")
            .mark_point(filled=True, size=55)
            .encode(
                shape=alt.Shape("status:N", title="status"),
                tooltip=tooltips(runs_points, ["status", "measure", "value", "final_val_loss"], RUN_MEASURE_COLUMNS),
            )
        )
    panels = alt.Column("measure:N", title=None, sort=[name for _, name in SWEEP_MEASURES])
    return (
        alt.layer(*layers, data=df)
        .properties(width=PANEL_WIDTH + 60, height=PANEL_HEIGHT + 30)
        .facet(column=panels)
        .resolve_scale(y="independent")
        .properties(title=chart_title(title_text, notes, width=2 * (PANEL_WIDTH + 80)))
    )


def sweep_points(runs: pd.DataFrame, x: str) -> pd.DataFrame:
    """One row per run and plottable measure (finite, positive): the run's configuration columns, `label`,
    `status`, `final_val_loss`, `measure` (as named in SWEEP_MEASURES) and `value`."""
    needed = {x, "run_id", *(column for column, _ in SWEEP_MEASURES)}
    if runs is None or runs.empty or not needed <= set(runs.columns):
        return pd.DataFrame()
    runs = runs[pd.to_numeric(runs[x], errors="coerce").notna()]
    if "label" not in runs.columns:
        runs = runs.assign(label="all runs")
    keep = [c for c in runs.columns if c not in RUN_MEASURE_COLUMNS or c in ("run_id", "label", "status",
                                                                                "final_val_loss")]
    frames = []
    for column, name in SWEEP_MEASURES:
        value = pd.to_numeric(runs[column], errors="coerce")
        ok = np.isfinite(value.to_numpy(dtype=float)) & (value.to_numpy(dtype=float) > 0)
        frames.append(runs.loc[ok, keep].assign(measure=name, value=value[ok].astype(float)))
    points = pd.concat(frames, ignore_index=True)
    return points.astype({x: float})


def log_axis(name: str, values: pd.Series | np.ndarray | list) -> bool:
    """Whether a swept axis reads best on a log scale: every value positive, and the axis is a learning
    rate, an epsilon or a weight decay (by the last part of its dotted name), or its values span at least
    two orders of magnitude."""
    v = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce"), dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0 or (v <= 0).any():
        return False
    return name.rsplit(".", 1)[-1] in LOG_AXES or v.max() / v.min() >= 100
