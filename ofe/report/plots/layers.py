"""Per-layer figures of the metrics table: kurtosis over training (one panel per configuration, as in
the paper's figures 2 and 4) and kurtosis, signal propagation and max-median ratio per layer at the end
of training. Where a configuration has several seeds, each draws the mean over them with a min-max band
(`plots.seeds`) instead of one line per run."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from ofe.report.plots.common import (
    FACET_COLUMNS, FADED, KURTOSIS_DEF, LAYER_NOTE, LAYER_SITES, LEGEND_NOTE, MMR_DEF, PANEL_HEIGHT, PANEL_WIDTH,
    TOKEN_CORRELATION_DEF, WIDE_HEIGHT, WIDE_WIDTH, chart_title, no_data, positive, select_metric,
    thin_steps, tooltips, vl_field,
)
from ofe.report.plots.seeds import (
    BAND_LEGEND, SEEDS_LEGEND_NOTE, band_note, band_opacity, configuration_keys, configuration_lines, has_replicates,
    seed_summary, summary_tooltips, value_y,
)


def kurtosis_over_steps(metrics: pd.DataFrame, facet: str = "label") -> alt.FacetChart | alt.Chart:
    """Per-layer kurtosis over training steps, one panel per value of `facet` (the paper's figs. 2 and 4).

    Layer is the (ordinal) colour. Each run is its own line; where a configuration has several seeds (and
    `facet` is a configuration column or the label), its line is their mean, with a min-max band.
    """
    df = thin_steps(positive(select_metric(metrics, "kurtosis", LAYER_SITES)))
    seeds = not df.empty and has_replicates(df) and facet in configuration_keys(df)
    notes = [KURTOSIS_DEF, LAYER_NOTE, f"log scale; one panel per {facet}; click a layer in the legend"]
    title = chart_title(
        "Kurtosis per layer over training",
        notes + ([band_note(df)] if seeds else []),
        width=FACET_COLUMNS * (PANEL_WIDTH + 20),
    )
    if df.empty:
        return no_data(title)
    pick = alt.selection_point(fields=["layer"], bind="legend")
    x = alt.X("step:Q", title="step")
    legend = alt.Legend(**BAND_LEGEND) if seeds else alt.Undefined
    color = alt.Color("layer:O", title="layer", scale=alt.Scale(scheme="viridis"), legend=legend)

    def lines(chart: alt.Chart, detail: str, tooltip: list) -> alt.Chart:
        """One Kurt line per `detail` (a run, or a configuration's seed mean), the layer as its colour."""
        return chart.mark_line(strokeWidth=1.5).encode(
            x=x,
            y=alt.Y("value:Q", title="Kurt", scale=alt.Scale(type="log")),
            color=color,
            detail=alt.Detail(detail),
            opacity=alt.condition(pick, alt.value(1.0), alt.value(FADED)),
            tooltip=tooltip,
        ).add_params(pick)

    if seeds:
        over = ["site", "layer", "step"]
        summary = seed_summary(df, over)
        band = alt.Chart().mark_area().encode(
            x=x,
            # stack=None: an area with a colour is stacked by default; each band sits at its own values.
            y=alt.Y("min:Q", title="Kurt", scale=alt.Scale(type="log"), stack=None),
            y2="max:Q",
            color=color,
            detail=alt.Detail("config:N"),
            opacity=band_opacity(pick),
        )
        line = lines(alt.Chart(), "config:N", summary_tooltips(summary, over))
        panel = alt.layer(band, line, data=summary).properties(width=PANEL_WIDTH, height=PANEL_HEIGHT)
    else:
        line = lines(alt.Chart(df), "run_id:N", tooltips(df, ["site", "layer", "step", "tokens", "value"]))
        panel = line.properties(width=PANEL_WIDTH, height=PANEL_HEIGHT)
    panels = alt.Facet(vl_field(facet), type="nominal", title=None)
    return panel.facet(facet=panels, columns=FACET_COLUMNS).properties(title=title)


def final_layer_kurtosis(metrics: pd.DataFrame, width: int = WIDE_WIDTH) -> alt.Chart | alt.LayerChart:
    """Kurtosis against layer at each run's last logged (finite) step; colour = label, log y."""
    return final_per_layer(
        metrics, "kurtosis", "Kurt", "Kurtosis per layer at the end of training", [KURTOSIS_DEF, LAYER_NOTE],
        log=True, width=width,
    )


def final_layer_mmr(metrics: pd.DataFrame, width: int = WIDE_WIDTH) -> alt.Chart | alt.LayerChart:
    """Max-median ratio against layer at each run's last logged (finite) step; colour = label, log y."""
    return final_per_layer(
        metrics, "max_median_ratio", "MMR", "Max-median ratio per layer at the end of training", [MMR_DEF, LAYER_NOTE],
        log=True, width=width,
    )


def final_layer_token_correlation(metrics: pd.DataFrame, width: int = WIDE_WIDTH) -> alt.Chart | alt.LayerChart:
    """Signal propagation (average token correlation) against layer at each run's last logged step."""
    return final_per_layer(
        metrics, "token_correlation", "token correlation", "Signal propagation per layer at the end of training",
        [TOKEN_CORRELATION_DEF, LAYER_NOTE], log=False, width=width,
    )


def final_per_layer(
    metrics: pd.DataFrame, metric: str, y_title: str, title_text: str, notes: list[str], log: bool,
    width: int = WIDE_WIDTH, sites: tuple[str, ...] = LAYER_SITES, share: bool = False,
) -> alt.Chart | alt.LayerChart:
    """`metric` at `sites` against layer, at each run's last step where every layer's value is
    plottable; the mean over seeds with a min-max band where a configuration has several. `share`: the
    metric is a fraction, drawn on a fixed 0-100% axis."""
    df = select_metric(metrics, metric, sites, finite_only=False)
    if not df.empty:
        # A diverging run can leave some layers non-finite at its last step; a curve missing those
        # layers would mislead, so fall back to the last step that is complete.
        plottable = np.isfinite(df["value"]) & ((df["value"] > 0) if log else True)
        df = df[plottable.groupby([df["run_id"], df["step"]]).transform("all")]
        df = df[df["step"] == df.groupby("run_id")["step"].transform("max")]
    seeds = not df.empty and has_replicates(df)
    last = "value at each run's last logged step with finite values; " + ("log scale; " if log else "")
    notes = notes + ([last + SEEDS_LEGEND_NOTE, band_note(df)] if seeds else [last + LEGEND_NOTE])
    title = chart_title(title_text, notes, width)
    if df.empty:
        return no_data(title)
    x = alt.X("layer:O", title="layer", axis=alt.Axis(labelAngle=0))
    return configuration_lines(df, x, ["site", "layer"], value_y(y_title, log, share), point=True,
                               measures=["site", "layer", "step", "tokens", "value"]
                               ).properties(title=title, width=width, height=WIDE_HEIGHT)
