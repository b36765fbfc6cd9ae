"""The figures of a checkpoint study (pretrained checkpoints inspected one by one, not a training grid):
kurtosis per layer against the checkpoint's training step (the paper's Figure 1 view), the per-layer
kurtosis profile of each checkpoint, the attention-sink rate against the step (Gu et al.'s view of
Pythia over training; where the tables carry it), and int8 degradation against the step.

Pure functions of the aggregated checkpoint tables (`checkpoint_metrics.parquet`,
`checkpoint_quant.parquet`: one row per checkpoint and layer/site/metric, or per protocol and bit width),
each row carrying its checkpoint's `ckpt_id`, `model`, `label` (the model's display name), `revision`,
`order` (config order), `step` and `tokens` (NaN where unknown). One panel per model label.

The x axis is the training step on a symlog scale (so step 0, the initialisation, shows beside steps in
the hundred thousands) when every checkpoint's step is known; where some step is unknown, a step axis
would drop those checkpoints, so x is the checkpoint itself (its revision, or the model's label for a
local folder without one) in config order. The caller decides (`by_step`) from the study's whole
checkpoint list, failed ones included, so every figure of a study uses the same axis.
"""

from __future__ import annotations

import math
from typing import Any

import altair as alt
import numpy as np
import pandas as pd

from ofe.report.plots.common import (
    ATTENTION_SITES, FACET_COLUMNS, FADED, KURTOSIS_DEF, SINK_DEF, WIDE_HEIGHT, WIDE_WIDTH, chart_title,
    column_tooltips, no_data, vl_field,
)
from ofe.report.plots.int8 import DEGRADATION_DEF, PROTOCOL_NAMES, SYMLOG_CONSTANT

CKPT_PANEL_WIDTH, CKPT_PANEL_HEIGHT = 260, 180
# Where the paper's Figure 1 measures kurtosis: the residual stream entering each decoder layer.
SITE = "block_input"
KURTOSIS_LAYER_NOTE = "layer l: residual stream entering decoder layer l"
STEP_NOTE = "x: training step of the checkpoint, symlog scale (linear below 1, logarithmic above: step 0 shows)"
ORDINAL_NOTE = "x: the checkpoint (revision) in config order: the training step of some checkpoint is unknown"
# The checkpoint's columns every figure keeps (and shows in its tooltips).
CHECKPOINT_COLUMNS = ["ckpt_id", "model", "label", "revision", "checkpoint", "order", "step", "tokens"]
STEP_LABEL = (
    "datum.value >= 1e6 ? format(datum.value / 1e6, '~g') + 'M' : "
    "datum.value >= 1e3 ? format(datum.value / 1e3, '~g') + 'k' : format(datum.value, '~g')"
)
# checkpoint_quant.parquet has no tokens column: shown where present.
INT8_TOOLTIPS = ("model", "revision", "step", "tokens", "protocol", "bits", "ppl_fp", "ppl_q", "degradation")
TOOLTIP_TITLES = {"value": "kurtosis", "label": "model label"}
SINK_TOOLTIPS = ("model", "revision", "step", "tokens", "layers", "value")
SINK_MEAN_NOTE = (
    "y: mean over the decoder layers, Gu et al.'s sink rate of the whole model (the share over sequences, "
    "layers and heads: every layer has as many heads)"
)


def steps_known(checkpoints: pd.DataFrame) -> bool:
    """Whether every checkpoint of `checkpoints` has a training step (an empty list counts as known)."""
    return "step" not in checkpoints.columns or bool(checkpoints["step"].notna().all())


def with_checkpoint_names(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with `checkpoint` = the revision, or the model's label where there is none (a local folder)."""
    revision = df["revision"].astype(object)
    return df.assign(checkpoint=revision.where(revision.notna(), df["label"]).astype(str))


def kurtosis_over_checkpoints(metrics: pd.DataFrame, by_step: bool | None = None) -> alt.Chart | alt.FacetChart:
    """Kurtosis at SITE per layer against the checkpoint's step (or, with `by_step` False, the checkpoint
    in config order; None: decided from `metrics`), one line per layer (sequential colour), log y, one
    panel per model label."""
    df = _kurtosis(metrics)
    by_step = steps_known(df) if by_step is None else by_step
    notes = [KURTOSIS_DEF, KURTOSIS_LAYER_NOTE, STEP_NOTE if by_step else ORDINAL_NOTE,
             "y: log scale; one panel per model; click a layer in the legend"]
    title = chart_title("Kurtosis per layer over training checkpoints", notes, width=_facet_width(df))
    if df.empty:
        return no_data(title)
    chart = _kurtosis_lines(df, "layer", x=_x(df, by_step), order=_path_order(by_step),
                            color=alt.Color("layer:O", title="layer", scale=alt.Scale(scheme="viridis")))
    return _facet(chart, df, title, independent_x=not by_step)


def layer_profile_by_checkpoint(metrics: pd.DataFrame, by_step: bool | None = None) -> alt.Chart | alt.FacetChart:
    """Kurtosis at SITE against layer, one line per checkpoint coloured by its step (or, with `by_step`
    False, by the checkpoint in config order), log y, one panel per model label: how the per-layer
    profile grows over training, the last checkpoint being the final per-layer view."""
    df = _kurtosis(metrics)
    by_step = steps_known(df) if by_step is None else by_step
    colour_note = ("colour = training step of the checkpoint" if by_step
                   else "colour = checkpoint in config order (the training step of some checkpoint is unknown)")
    notes = [KURTOSIS_DEF, KURTOSIS_LAYER_NOTE, f"one line per checkpoint, {colour_note}; y: log scale; "
             "click a legend entry to highlight it"]
    title = chart_title("Kurtosis per layer at each checkpoint", notes, width=_facet_width(df))
    if df.empty:
        return no_data(title)
    if by_step:
        field, colour = "step", alt.Color("step:O", title="step", scale=alt.Scale(scheme="viridis"))
    else:
        field = "checkpoint"
        colour = alt.Color("checkpoint:O", title="checkpoint", scale=alt.Scale(scheme="viridis"),
                           sort=alt.EncodingSortField("order", op="min"))
    chart = _kurtosis_lines(df, field, x=alt.X("layer:O", title="layer", axis=alt.Axis(labelAngle=0)),
                            color=colour, detail=alt.Detail("ckpt_id:N"))
    # Models of different depths: each panel its own layers.
    return _facet(chart, df, title, independent_x=True)


def _kurtosis_lines(df: pd.DataFrame, legend_field: str, **encoding: Any) -> alt.Chart:
    """Kurt on a log y as lines with points, one panel's size, clicking the legend (on `legend_field`)
    highlighting its lines; `encoding` gives x, colour and how points join into lines."""
    pick = alt.selection_point(fields=[legend_field], bind="legend")
    return (
        alt.Chart(df)
        .mark_line(point=True, strokeWidth=1.5)
        .encode(
            y=alt.Y("value:Q", title="Kurt", scale=alt.Scale(type="log")),
            opacity=alt.condition(pick, alt.value(1.0), alt.value(FADED)),
            tooltip=column_tooltips(df, ["model", "revision", "step", "tokens", "layer", "value"], TOOLTIP_TITLES),
            **encoding,
        )
        .add_params(pick)
        .properties(width=CKPT_PANEL_WIDTH, height=CKPT_PANEL_HEIGHT)
    )


def sink_rate_over_checkpoints(metrics: pd.DataFrame, by_step: bool | None = None) -> alt.Chart:
    """The attention-sink rate averaged over layers against the checkpoint's step (same x rule as
    `kurtosis_over_checkpoints`), one line per model label (colour) on one 0-100% axis, so that models
    compare at equal steps."""
    df = sink_rate_points(metrics)
    by_step = steps_known(df) if by_step is None else by_step
    notes = [SINK_DEF, SINK_MEAN_NOTE, STEP_NOTE if by_step else ORDINAL_NOTE,
             "one line per model, colour = model; click a legend entry to highlight it"]
    title = chart_title("Attention-sink rate over training checkpoints", notes)
    if df.empty:
        return no_data(title)
    pick = alt.selection_point(fields=["label"], bind="legend")
    labels = list(dict.fromkeys(df.sort_values("order", kind="stable")["label"]))
    return (
        alt.Chart(df)
        .mark_line(point=True, strokeWidth=1.5)
        .encode(
            x=_x(df, by_step),
            y=alt.Y("value:Q", title="sink rate, mean over layers", scale=alt.Scale(domain=[0, 1]),
                    axis=alt.Axis(format="%")),
            color=alt.Color("label:N", title="model", sort=labels, legend=alt.Legend(labelLimit=300)),
            order=_path_order(by_step),
            opacity=alt.condition(pick, alt.value(1.0), alt.value(FADED)),
            tooltip=column_tooltips(df, [c for c in SINK_TOOLTIPS if c in df.columns],
                                    {"value": "sink rate", "layers": "layers"}),
        )
        .add_params(pick)
        .properties(title=title, width=WIDE_WIDTH, height=WIDE_HEIGHT)
    )


def sink_rate_points(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per checkpoint with a sink rate at every layer, all finite: its checkpoint columns,
    `value` = the mean over layers and `layers` = how many."""
    needed = {"metric", "site", "value", "layer", "ckpt_id", "revision", "label"}
    if metrics is None or metrics.empty or not needed <= set(metrics.columns):
        return pd.DataFrame()
    df = metrics[(metrics["metric"] == "sink_rate") & metrics["site"].isin(ATTENTION_SITES)]
    finite = pd.Series(np.isfinite(df["value"].to_numpy(dtype=float)), index=df.index)
    df = df[finite.groupby(df["ckpt_id"]).transform("all")]
    if df.empty:
        return pd.DataFrame()
    per_ckpt = df.groupby("ckpt_id", sort=False).agg(value=("value", "mean"), layers=("layer", "nunique"))
    keep = [c for c in CHECKPOINT_COLUMNS if c in df.columns and c != "checkpoint"]
    first = with_checkpoint_names(df.drop_duplicates("ckpt_id")[keep])
    return first.join(per_ckpt, on="ckpt_id").reset_index(drop=True)


def int8_over_checkpoints(quant: pd.DataFrame, by_step: bool | None = None) -> alt.Chart | alt.FacetChart:
    """Relative perplexity degradation after quantisation (ppl_q / ppl_fp - 1, axis in %) against the
    checkpoint's step (same x rule as `kurtosis_over_checkpoints`), one line per protocol and bit width,
    one panel per model label. Checkpoints without finite perplexities are left out."""
    df = int8_points(quant)
    by_step = steps_known(df) if by_step is None else by_step
    notes = [f"y: {DEGRADATION_DEF}", STEP_NOTE if by_step else ORDINAL_NOTE,
             "one line per protocol and bit width; one panel per model; click a legend entry to highlight it"]
    title_text = "Quantisation degradation over training checkpoints"
    if df.empty:
        return no_data(chart_title(title_text, notes, width=_facet_width(df)))
    # A log axis cannot show a checkpoint that quantisation leaves unchanged or improves; symlog can.
    if bool((df["degradation"] > 0).all()):
        y_scale, y_note = alt.Scale(type="log"), "y: log scale"
    else:
        y_scale = alt.Scale(type="symlog", constant=SYMLOG_CONSTANT)
        y_note = f"y: symlog scale (linear within ±{SYMLOG_CONSTANT:.0%}; some checkpoints do not degrade)"
    title = chart_title(title_text, [*notes, y_note], width=_facet_width(df))
    pick = alt.selection_point(fields=["series"], bind="legend")
    chart = (
        alt.Chart(df)
        .mark_line(point=True, strokeWidth=1.5)
        .encode(
            x=_x(df, by_step),
            y=alt.Y("degradation:Q", title="ppl_q / ppl_fp - 1", scale=y_scale, axis=alt.Axis(format="~%")),
            color=alt.Color("series:N", title="protocol, bits", scale=alt.Scale(scheme="dark2"),
                            sort=list(dict.fromkeys(df["series"])),
                            legend=alt.Legend(labelLimit=300)),
            order=_path_order(by_step),
            opacity=alt.condition(pick, alt.value(1.0), alt.value(FADED)),
            tooltip=column_tooltips(df, [c for c in INT8_TOOLTIPS if c in df.columns], TOOLTIP_TITLES),
        )
        .add_params(pick)
        .properties(width=CKPT_PANEL_WIDTH, height=CKPT_PANEL_HEIGHT)
    )
    return _facet(chart, df, title, independent_x=not by_step)


def int8_points(quant: pd.DataFrame) -> pd.DataFrame:
    """The plottable int8 rows (finite perplexities, ppl_fp > 0) with `degradation` = ppl_q / ppl_fp - 1
    and `series` = protocol and bit width, e.g. "static per-tensor W8A8"."""
    needed = {"protocol", "bits", "ppl_fp", "ppl_q", "revision", "label"}
    if quant is None or quant.empty or not needed <= set(quant.columns):
        return pd.DataFrame()
    ppl_fp, ppl_q = quant["ppl_fp"].to_numpy(dtype=float), quant["ppl_q"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        degradation = ppl_q / ppl_fp - 1.0
    ok = np.isfinite(degradation) & (ppl_fp > 0)
    df = with_checkpoint_names(quant.assign(degradation=degradation)[ok])
    # Legend order as the int8 tables': known protocols first (static, then dynamic), widest bits first.
    rank = {p: i for i, p in enumerate(PROTOCOL_NAMES)}
    df = df.sort_values(["protocol", "bits"], key=lambda c: c.map(rank).fillna(len(rank)) if c.name == "protocol"
                        else -c, kind="stable")
    series = [f"{PROTOCOL_NAMES.get(p, p)} W{b}A{b}" for p, b in zip(df["protocol"], df["bits"])]
    keep = [c for c in CHECKPOINT_COLUMNS if c in df.columns]
    return df.assign(series=series)[[*keep, "series", "protocol", "bits", "ppl_fp", "ppl_q", "degradation"]]


def _kurtosis(metrics: pd.DataFrame) -> pd.DataFrame:
    """The finite, positive (log axis) kurtosis rows at SITE, with the checkpoint columns and `checkpoint`."""
    needed = {"metric", "site", "value", "layer", "revision", "label"}
    if metrics is None or metrics.empty or not needed <= set(metrics.columns):
        return pd.DataFrame()
    df = metrics[(metrics["metric"] == "kurtosis") & (metrics["site"] == SITE)]
    value = df["value"].to_numpy(dtype=float)
    df = with_checkpoint_names(df[np.isfinite(value) & (value > 0)])
    keep = [c for c in CHECKPOINT_COLUMNS if c in df.columns]
    return df[[*keep, "layer", "value"]].reset_index(drop=True)


def _x(df: pd.DataFrame, by_step: bool) -> alt.X:
    if by_step:
        # Vega's symlog axis places its ticks linearly, nearly all of them at the far right: 0 and 1, 2, 5
        # times powers of ten from 10 instead (1 would sit on top of 0), labelled 10k rather than 10000.
        # Not the "~s" format: Vega gives every label of an axis the largest tick's SI prefix ("0k" for 10).
        top = float(df["step"].max()) if not df.empty else 0.0
        ticks = [0] + [m * 10**k for k in range(1, int(math.log10(top)) + 1) for m in (1, 2, 5)
                       if m * 10**k <= top] if top >= 10 else [0]
        return alt.X("step:Q", title="training step", scale=alt.Scale(type="symlog", constant=1),
                     axis=alt.Axis(values=ticks, labelExpr=STEP_LABEL))
    return alt.X("checkpoint:O", title="checkpoint (config order)", sort=alt.EncodingSortField("order", op="min"),
                 axis=alt.Axis(labelAngle=-45))


def _path_order(by_step: bool) -> alt.Order:
    """The order in which a line joins its points: by step, or config order on the ordinal axis (a line
    on an ordinal axis otherwise joins its points in the order of the names, not of the axis)."""
    return alt.Order("step:Q") if by_step else alt.Order("order:Q")


def _facet(chart: alt.Chart, df: pd.DataFrame, title: alt.TitleParams, independent_x: bool) -> alt.FacetChart:
    """One panel per model label, in config order; `independent_x`: each panel its own x (checkpoints on
    an ordinal axis, since two models rarely share their revisions; layers of models of different depth)."""
    labels = list(dict.fromkeys(df.sort_values("order", kind="stable")["label"]))
    faceted = chart.facet(
        facet=alt.Facet(vl_field("label"), type="nominal", title=None, sort=labels),
        columns=min(FACET_COLUMNS, len(labels)),
    ).properties(title=title)
    if independent_x:
        faceted = faceted.resolve_scale(x="independent")
    return faceted


def _facet_width(df: pd.DataFrame) -> int:
    panels = df["label"].nunique() if not df.empty and "label" in df.columns else 1
    return min(FACET_COLUMNS, max(panels, 1)) * (CKPT_PANEL_WIDTH + 20)
