"""Loss curves: training loss on the logged batches and validation loss against step. Where a
configuration has several seeds, each draws the mean over them with a min-max band (`plots.seeds`)."""

from __future__ import annotations

import altair as alt
import pandas as pd

from ofe.report.plots.common import (
    FADED, LEGEND_NOTE, WIDE_HEIGHT, WIDE_WIDTH, chart_title, label_color, no_data, positive, select_metric,
    thin_steps, tooltips,
)
from ofe.report.plots.seeds import (
    BAND_LEGEND, SEEDS_LEGEND_NOTE, band_note, band_opacity, has_replicates, seed_summary, summary_tooltips,
)

VAL_LINE = {"strokeDash": [4, 3], "point": alt.OverlayMarkDef(filled=True, size=30)}  # dashed, with points
TRAIN_LINE = {"strokeWidth": 1.2}


def loss_curves(metrics: pd.DataFrame) -> alt.LayerChart | alt.Chart:
    """Training loss (lines) and validation loss (dashed lines with points) against step; colour = label."""
    train = thin_steps(positive(select_metric(metrics, "loss", ("train",))))
    val = positive(select_metric(metrics, "loss", ("val",)))
    both = pd.concat([train, val], ignore_index=True)
    seeds = not both.empty and has_replicates(both)
    notes = ["solid: training loss (logged batches); dashed with points: validation loss"]
    notes += [SEEDS_LEGEND_NOTE + "; log scale", band_note(both)] if seeds else [LEGEND_NOTE + "; log scale"]
    title = chart_title("Loss curves", notes)
    if train.empty and val.empty:
        return no_data(title)
    pick = alt.selection_point(fields=["label"], bind="legend")
    curves = [(frame, style) for frame, style in ((train, TRAIN_LINE), (val, VAL_LINE)) if not frame.empty]
    if seeds:
        layers = _band_layers(curves, pick)
    else:
        layers = [alt.Chart(frame).mark_line(**style).encode(**_loss_encoding(frame, pick)) for frame, style in curves]
        # The selection is defined on the first layer only: a parameter defined twice in one spec is an error.
        layers[0] = layers[0].add_params(pick)
    return alt.layer(*layers).properties(title=title, width=WIDE_WIDTH, height=WIDE_HEIGHT)


def _loss_encoding(df: pd.DataFrame, pick: alt.Parameter) -> dict:
    return dict(
        x=alt.X("step:Q", title="step"),
        y=alt.Y("value:Q", title="loss", scale=alt.Scale(type="log")),
        color=label_color(),
        detail=alt.Detail("run_id:N"),
        opacity=alt.condition(pick, alt.value(1.0), alt.value(FADED)),
        tooltip=tooltips(df, ["site", "step", "tokens", "value"]),
    )


def _band_layers(curves: list[tuple[pd.DataFrame, dict]], pick: alt.Parameter) -> list[alt.Chart]:
    """Every curve's band, then every curve's mean line (so no band covers a line); the selection is
    defined on the first line."""
    over = ["site", "step"]
    bands, lines = [], []
    for frame, style in curves:
        summary = seed_summary(frame, over)
        common = dict(x=alt.X("step:Q", title="step"), color=label_color(BAND_LEGEND), detail=alt.Detail("config:N"))
        bands.append(alt.Chart(summary).mark_area().encode(
            # stack=None: an area with a colour is stacked by default; each band sits at its own values.
            y=alt.Y("min:Q", title="loss", scale=alt.Scale(type="log"), stack=None),
            y2="max:Q",
            opacity=band_opacity(pick),
            **common,
        ))
        lines.append(alt.Chart(summary).mark_line(**style).encode(
            y=alt.Y("value:Q", title="loss", scale=alt.Scale(type="log")),
            opacity=alt.condition(pick, alt.value(1.0), alt.value(FADED)),
            tooltip=summary_tooltips(summary, over),
            **common,
        ))
    lines[0] = lines[0].add_params(pick)
    return bands + lines
