"""Loss curves: training loss on the logged batches and validation loss against step."""

from __future__ import annotations

import altair as alt
import pandas as pd

from ofe.plots_common import (
    FADED, LEGEND_NOTE, WIDE_HEIGHT, WIDE_WIDTH, chart_title, label_color, no_data, positive, select_metric,
    thin_steps, tooltips,
)


def loss_curves(metrics: pd.DataFrame) -> alt.LayerChart | alt.Chart:
    """Training loss (lines) and validation loss (dashed lines with points) against step; colour = label."""
    title = chart_title(
        "Loss curves",
        ["solid: training loss (logged batches); dashed with points: validation loss", LEGEND_NOTE + "; log scale"],
    )
    train = thin_steps(positive(select_metric(metrics, "loss", ("train",))))
    val = positive(select_metric(metrics, "loss", ("val",)))
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


def _loss_encoding(df: pd.DataFrame, pick: alt.Parameter) -> dict:
    return dict(
        x=alt.X("step:Q", title="step"),
        y=alt.Y("value:Q", title="loss", scale=alt.Scale(type="log")),
        color=label_color(),
        detail=alt.Detail("run_id:N"),
        opacity=alt.condition(pick, alt.value(1.0), alt.value(FADED)),
        tooltip=tooltips(df, ["site", "step", "tokens", "value"]),
    )
