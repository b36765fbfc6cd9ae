"""Per-layer figures of the metrics table: kurtosis over training (one panel per configuration, as in
the paper's figures 2 and 4) and kurtosis, signal propagation and max-median ratio per layer at the end
of training."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from ofe.plots_common import (
    FACET_COLUMNS, FADED, KURTOSIS_DEF, LAYER_NOTE, LAYER_SITES, LEGEND_NOTE, MMR_DEF, PANEL_HEIGHT, PANEL_WIDTH,
    TOKEN_CORRELATION_DEF, WIDE_HEIGHT, WIDE_WIDTH, chart_title, label_color, no_data, positive, select_metric,
    thin_steps, tooltips, vl_field,
)


def kurtosis_over_steps(metrics: pd.DataFrame, facet: str = "label") -> alt.FacetChart | alt.Chart:
    """Per-layer kurtosis over training steps, one panel per value of `facet` (the paper's figs. 2 and 4).

    Layer is the (ordinal) colour; each run is its own line, so seeds sharing a label overlap.
    """
    title = chart_title(
        "Kurtosis per layer over training",
        [KURTOSIS_DEF, LAYER_NOTE, f"log scale; one panel per {facet}; click a layer in the legend"],
        width=FACET_COLUMNS * (PANEL_WIDTH + 20),
    )
    df = thin_steps(positive(select_metric(metrics, "kurtosis", LAYER_SITES)))
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
    panels = alt.Facet(vl_field(facet), type="nominal", title=None)
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


def _final_note(log: bool) -> str:
    return "value at each run's last logged step with finite values; " + ("log scale; " if log else "") + LEGEND_NOTE


def _final_per_layer(
    metrics: pd.DataFrame, metric: str, y_title: str, title: alt.TitleParams, log: bool, width: int = WIDE_WIDTH
) -> alt.Chart:
    """`metric` at LAYER_SITES against layer, at each run's last step where every layer's value is plottable."""
    df = select_metric(metrics, metric, LAYER_SITES, finite_only=False)
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
            color=label_color(),
            detail=alt.Detail("run_id:N"),
            opacity=alt.condition(pick, alt.value(1.0), alt.value(FADED)),
            tooltip=tooltips(df, ["site", "layer", "step", "tokens", "value"]),
        )
        .add_params(pick)
        .properties(title=title, width=width, height=WIDE_HEIGHT)
    )
