"""Altair charts of the tidy metrics table (`metrics.parquet`) and of the quantisation table (`quant.parquet`).

Every public function is pure: it takes the long/tidy metrics DataFrame (columns `run_id`, the grid
columns, `step`, `tokens`, `layer`, `site`, `metric`, `value`, plus a `label` string per run that names
the run's group, e.g. "block=pre_ln") and returns an `alt.Chart` (or layered/faceted chart). No file I/O.
`quant_degradation_scatter` takes the quantisation table instead (one row per run, protocol and bit
width: `ppl_fp`, `ppl_q`, `mean_kurtosis`, ...), and `sweep_lines` the runs table (one row per run:
grid columns, `status`, `peak_kurtosis`, `final_mean_kurtosis`, ...).

Conventions shared by all charts:
- Non-finite values (diverged runs) are dropped before plotting; log-scaled charts also drop values <= 0.
- Every column that is neither a measurement column nor `run_id`/`label` is taken as a run
  configuration (grid) column and shown in tooltips.
- Categorical colours come with a legend-bound selection: clicking a legend entry highlights it.
- A chart whose data is empty renders a "no data" text mark instead of raising.
"""

from __future__ import annotations

import textwrap

import altair as alt
import numpy as np
import pandas as pd

# Where the paper's kurtosis curves are measured: the residual stream entering each block (layers
# 0..L-1) and the tensor actually fed to the unembedding, after any final norm (layer L).
LAYER_SITES = ("block_input", "unembed_input")

# Columns that describe a measurement rather than a run's configuration.
_MEASURE_COLUMNS = frozenset({"run_id", "label", "step", "tokens", "layer", "site", "metric", "value"})

FACET_COLUMNS = 4
PANEL_WIDTH, PANEL_HEIGHT = 200, 150  # one facet panel
WIDE_WIDTH, WIDE_HEIGHT = 460, 260  # a single-panel chart
# Over-steps charts keep at most this many logged steps per run so the self-contained page stays small.
MAX_STEPS_PER_RUN = 300
FADED = 0.12  # opacity of marks not picked in the legend
LEGEND_WIDTH = 160  # about what a legend adds to a chart's width, for wrapping subtitles
SUBTITLE_CHAR_WIDTH = 6.0  # pixels per character of a subtitle at Vega's default font size

KURTOSIS_DEF = (
    "Kurt = mean_j(s_j^4) / mean_j(s_j^2)^2 with s_j the RMS of neuron j over tokens "
    "(the paper's uncentred definition: 1 = all neurons equal, up to the width d)"
)
MMR_DEF = "MMR = mean over tokens of max_j |x_j| / median_j |x_j| (about 5 for Gaussian activations)"
TOKEN_CORRELATION_DEF = (
    "mean off-diagonal entry of the token Gram matrix of width-centred, RMS-normalised activations "
    "(near 1 = rank collapse)"
)
_LEGEND_NOTE = "one line per run, colour = configuration; click a legend entry to highlight it"
MEAN_KURTOSIS_DEF = "Kurt averaged over layers at the run's last logged step"
# Columns of the runs table (runs.parquet) that describe a measurement rather than a run's configuration.
_RUN_MEASURE_COLUMNS = frozenset(
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
REPLICATE_AXES = ("seed",)  # averaged over, never an x axis
LAYER_NOTE = "layer l < L: residual stream entering block l; layer L: input to the unembedding (after any final norm)"


def kurtosis_over_steps(metrics: pd.DataFrame, facet: str = "label") -> alt.FacetChart | alt.Chart:
    """Per-layer kurtosis over training steps, one panel per value of `facet` (the paper's figs. 2 and 4).

    Layer is the (ordinal) colour; each run is its own line, so seeds sharing a label overlap.
    """
    title = chart_title(
        "Kurtosis per layer over training",
        [KURTOSIS_DEF, LAYER_NOTE, f"log scale; one panel per {facet}; click a layer in the legend"],
        width=FACET_COLUMNS * (PANEL_WIDTH + 20),
    )
    df = _thin_steps(_positive(_select(metrics, "kurtosis", LAYER_SITES)))
    if df.empty:
        return no_data(title)
    pick = alt.selection_point(fields=["layer"], bind="legend")
    panel = (
        alt.Chart(df)
        .mark_line(strokeWidth=1.5)
        .encode(
            x=alt.X("step:Q", title="step"),
            y=alt.Y("value:Q", title="Kurt", scale=alt.Scale(type="log")),
            color=alt.Color("layer:O", title="layer", scale=alt.Scale(scheme="viridis")),
            detail=alt.Detail("run_id:N"),
            opacity=alt.condition(pick, alt.value(1.0), alt.value(FADED)),
            tooltip=tooltips(df, ["site", "layer", "step", "tokens", "value"]),
        )
        .add_params(pick)
        .properties(width=PANEL_WIDTH, height=PANEL_HEIGHT)
    )
    panels = alt.Facet(_field(facet), type="nominal", title=None)
    return panel.facet(facet=panels, columns=FACET_COLUMNS).properties(title=title)


def final_layer_kurtosis(metrics: pd.DataFrame, width: int = WIDE_WIDTH) -> alt.Chart:
    """Kurtosis against layer at each run's last logged (finite) step; colour = label, log y."""
    return _final_per_layer(
        metrics,
        metric="kurtosis",
        y_title="Kurt",
        title=chart_title(
            "Kurtosis per layer at the end of training", [KURTOSIS_DEF, LAYER_NOTE, _final_note(log=True)], width
        ),
        log=True,
        width=width,
    )


def final_layer_mmr(metrics: pd.DataFrame, width: int = WIDE_WIDTH) -> alt.Chart:
    """Max-median ratio against layer at each run's last logged (finite) step; colour = label, log y."""
    return _final_per_layer(
        metrics,
        metric="max_median_ratio",
        y_title="MMR",
        title=chart_title(
            "Max-median ratio per layer at the end of training", [MMR_DEF, LAYER_NOTE, _final_note(log=True)], width
        ),
        log=True,
        width=width,
    )


def final_layer_token_correlation(metrics: pd.DataFrame, width: int = WIDE_WIDTH) -> alt.Chart:
    """Signal propagation (average token correlation) against layer at each run's last logged step."""
    return _final_per_layer(
        metrics,
        metric="token_correlation",
        y_title="token correlation",
        title=chart_title(
            "Signal propagation per layer at the end of training",
            [TOKEN_CORRELATION_DEF, LAYER_NOTE, _final_note(log=False)],
            width,
        ),
        log=False,
        width=width,
    )


def loss_curves(metrics: pd.DataFrame) -> alt.LayerChart | alt.Chart:
    """Training loss (lines) and validation loss (dashed lines with points) against step; colour = label."""
    title = chart_title(
        "Loss curves",
        ["solid: training loss (logged batches); dashed with points: validation loss", _LEGEND_NOTE + "; log scale"],
    )
    train = _thin_steps(_positive(_select(metrics, "loss", ("train",))))
    val = _positive(_select(metrics, "loss", ("val",)))
    if train.empty and val.empty:
        return no_data(title)
    pick = alt.selection_point(fields=["label"], bind="legend")
    layers = []
    if not train.empty:
        layers.append(alt.Chart(train).mark_line(strokeWidth=1.2).encode(**_loss_encoding(train, pick)))
    if not val.empty:
        layers.append(
            alt.Chart(val)
            .mark_line(strokeDash=[4, 3], point=alt.OverlayMarkDef(filled=True, size=30))
            .encode(**_loss_encoding(val, pick))
        )
    # The selection is defined on the first layer only: a parameter defined twice in one spec is an error.
    layers[0] = layers[0].add_params(pick)
    return alt.layer(*layers).properties(title=title, width=WIDE_WIDTH, height=WIDE_HEIGHT)


def sweep_lines(runs: pd.DataFrame, x: str, log_x: bool | None = None) -> alt.FacetChart | alt.Chart:
    """Peak and final mean kurtosis against a swept axis `x` (one panel each, log y): one line per
    `label` (the study's other swept axes) through the mean over the runs sharing a value (the seeds),
    every run as a point (shape = status).

    `runs` is runs.parquet's rows of one study with a `label` column (without one, all runs are one
    series). Runs without a finite, positive value (failed, missing) are left out of that panel.
    `log_x` defaults to `log_axis(x, values)`.
    """
    notes = [PEAK_KURTOSIS_DEF, f"final mean Kurt = {MEAN_KURTOSIS_DEF}; {KURTOSIS_DEF}"]
    title_text = f"Kurtosis against {x}"
    points = sweep_points(runs, x)
    if points.empty:
        return no_data(chart_title(title_text, notes))
    if log_x is None:
        log_x = log_axis(x, points[x])
    notes.append(
        "lines: mean over the runs at each value (seeds); points: the individual runs, shape = status; "
        f"x {'log' if log_x else 'linear'} scale, y log scale"
    )
    notes.append("colour = the study's other swept axes; click a legend entry to highlight it")
    means = (
        points.groupby([x, "label", "measure"], sort=False, dropna=False)["value"]
        .agg(["mean", "size"])
        .reset_index()
        .rename(columns={"mean": "value", "size": "n"})
        .assign(kind="mean")
    )
    df = pd.concat([points.assign(kind="run"), means], ignore_index=True)
    x_field = _field(x)
    pick = alt.selection_point(fields=["label"], bind="legend")
    base = alt.Chart().encode(
        x=alt.X(
            f"{x_field}:Q",
            title=x,
            # Padding keeps the points at the first and last value clear of the panel's edges.
            scale=alt.Scale(type="log", nice=False, padding=14) if log_x
            else alt.Scale(zero=False, nice=False, padding=14),
            axis=alt.Axis(format="~g", values=sorted(points[x].unique().tolist())),
        ),
        y=alt.Y("value:Q", title="Kurt", scale=alt.Scale(type="log")),
        color=_label_color(),
        opacity=alt.condition(pick, alt.value(1.0), alt.value(FADED)),
    )
    line = (
        base.transform_filter(alt.datum.kind == "mean")
        .mark_line(strokeWidth=2)
        .encode(
            tooltip=[
                alt.Tooltip("label:N", title="label"),
                alt.Tooltip(f"{x_field}:Q", title=x, format="~g"),
                alt.Tooltip("measure:N", title="measure"),
                alt.Tooltip("value:Q", title="mean", format=".4~g"),
                alt.Tooltip("n:Q", title="runs"),
            ]
        )
        .add_params(pick)
    )
    run_points = (
        base.transform_filter(alt.datum.kind == "run")
        .mark_point(filled=True, size=55)
        .encode(
            shape=alt.Shape("status:N", title="status"),
            tooltip=tooltips(points, ["status", "measure", "value", "final_val_loss"], _RUN_MEASURE_COLUMNS),
        )
    )
    panels = alt.Column("measure:N", title=None, sort=[name for _, name in SWEEP_MEASURES])
    return (
        alt.layer(line, run_points, data=df)
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
    keep = [c for c in runs.columns if c not in _RUN_MEASURE_COLUMNS or c in ("run_id", "label", "status",
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


def _final_note(log: bool) -> str:
    return "value at each run's last logged step with finite values; " + ("log scale; " if log else "") + _LEGEND_NOTE


def _loss_encoding(df: pd.DataFrame, pick: alt.Parameter) -> dict:
    return dict(
        x=alt.X("step:Q", title="step"),
        y=alt.Y("value:Q", title="loss", scale=alt.Scale(type="log")),
        color=_label_color(),
        detail=alt.Detail("run_id:N"),
        opacity=alt.condition(pick, alt.value(1.0), alt.value(FADED)),
        tooltip=tooltips(df, ["site", "step", "tokens", "value"]),
    )


def _final_per_layer(
    metrics: pd.DataFrame, metric: str, y_title: str, title: alt.TitleParams, log: bool, width: int = WIDE_WIDTH
) -> alt.Chart:
    """`metric` at LAYER_SITES against layer, at each run's last step where every layer's value is plottable."""
    df = _select(metrics, metric, LAYER_SITES, finite_only=False)
    if not df.empty:
        # A diverging run can leave some layers non-finite at its last step; a curve missing those
        # layers would mislead, so fall back to the last step that is complete.
        plottable = np.isfinite(df["value"]) & ((df["value"] > 0) if log else True)
        df = df[plottable.groupby([df["run_id"], df["step"]]).transform("all")]
        df = df[df["step"] == df.groupby("run_id")["step"].transform("max")]
    if df.empty:
        return no_data(title)
    pick = alt.selection_point(fields=["label"], bind="legend")
    return (
        alt.Chart(df)
        .mark_line(point=True, strokeWidth=1.5)
        .encode(
            x=alt.X("layer:O", title="layer", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("value:Q", title=y_title, scale=alt.Scale(type="log") if log else alt.Scale(zero=False)),
            color=_label_color(),
            detail=alt.Detail("run_id:N"),
            opacity=alt.condition(pick, alt.value(1.0), alt.value(FADED)),
            tooltip=tooltips(df, ["site", "layer", "step", "tokens", "value"]),
        )
        .add_params(pick)
        .properties(title=title, width=width, height=WIDE_HEIGHT)
    )


def _select(metrics: pd.DataFrame, metric: str, sites: tuple[str, ...], finite_only: bool = True) -> pd.DataFrame:
    """Rows of one metric at the given sites (finite values only, unless told), without the metric column."""
    if metrics.empty or not {"metric", "site", "value"} <= set(metrics.columns):
        return pd.DataFrame()
    df = metrics[(metrics["metric"] == metric) & metrics["site"].isin(sites)]
    if finite_only:
        df = df[np.isfinite(df["value"].to_numpy(dtype=float))]
    if "label" not in df.columns:  # called outside the report: each run is its own group
        df = df.assign(label=df["run_id"])
    return df.drop(columns=["metric"]).reset_index(drop=True)


def _positive(df: pd.DataFrame) -> pd.DataFrame:
    """Drop values a log scale cannot show."""
    return df[df["value"] > 0] if not df.empty else df


def _thin_steps(df: pd.DataFrame, max_steps: int = MAX_STEPS_PER_RUN) -> pd.DataFrame:
    """Keep at most about `max_steps` evenly strided logged steps per run, always including the last."""
    if df.empty:
        return df
    by_run = df.groupby("run_id")["step"]
    rank = by_run.rank(method="dense").astype(int) - 1
    n_steps = by_run.transform("nunique")
    stride = np.ceil(n_steps / max_steps).astype(int)
    return df[(rank % stride == 0) | (rank == n_steps - 1)]


def _field(name: str) -> str:
    """A column name as a Vega-Lite field: dots and brackets mean nested access there, so escape them."""
    for char in "\\.[]":
        name = name.replace(char, "\\" + char)
    return name


def tooltips(
    df: pd.DataFrame, measures: list[str], measure_columns: frozenset[str] = _MEASURE_COLUMNS
) -> list[alt.Tooltip]:
    """run_id, label (if any), every configuration column of `df`, then the given measurement columns."""
    config = [c for c in df.columns if c not in measure_columns]
    out = [alt.Tooltip("run_id:N", title="run")]
    if "label" in df.columns:
        out.append(alt.Tooltip("label:N", title="label"))
    for column in config + [m for m in measures if m in df.columns]:
        numeric = pd.api.types.is_numeric_dtype(df[column]) and not pd.api.types.is_bool_dtype(df[column])
        out.append(
            alt.Tooltip(
                field=_field(column),
                type="quantitative" if numeric else "nominal",
                title=column,
                format=_TOOLTIP_FORMATS.get(column, alt.Undefined),
            )
        )
    return out


_TOOLTIP_FORMATS = {
    "value": ".4~g", "ppl_fp": ".4~f", "ppl_q": ".4~f", "mean_kurtosis": ".4~g", "peak_kurtosis": ".4~g",
    "degradation": ".3~%",
}


def _label_color() -> alt.Color:
    return alt.Color("label:N", title="configuration", legend=alt.Legend(labelLimit=300))


def chart_title(text: str, subtitle: list[str], width: int = WIDE_WIDTH) -> alt.TitleParams:
    """A title whose subtitle lines are wrapped to about the chart's width (`width`: its plot area; the
    legend adds about LEGEND_WIDTH), so a long definition never makes the chart wider than its plot."""
    chars = max(60, int((width + LEGEND_WIDTH) / SUBTITLE_CHAR_WIDTH))
    lines = [line for note in subtitle for line in textwrap.wrap(note, chars, break_on_hyphens=False) or [""]]
    return alt.TitleParams(text=text, subtitle=lines, anchor="start", subtitleColor="#555")


def no_data(title: alt.TitleParams) -> alt.Chart:
    """A chart that says there is nothing to plot (a study whose runs are all missing, for instance)."""
    return (
        alt.Chart(pd.DataFrame({"text": ["no data"]}))
        .mark_text(size=16, color="gray")
        .encode(text="text:N")
        .properties(title=title, width=WIDE_WIDTH, height=60)
    )
