"""Figures of attention sinks and massive activations (issue 23), from the metrics table: the sink rate
(Gu et al. 2024) and the massive ratio, top-1 |h| over median |h| (Sun et al. 2024), per layer at the
end of training and over training, one line per configuration. Where a configuration has several
seeds, each draws the mean over them with a min-max band (`plots.seeds`), as the kurtosis figures do.

Over training, one number per run and step stands for its layers:
- the sink rate is averaged over layers: that mean is Gu et al.'s sink rate of a whole model, the share
  of (sequence, layer, head) triples over the threshold, since every layer has as many heads;
- the massive ratio is its maximum over layers: a massive activation lives in a few layers, from where
  it appears on (Sun et al.); averaged with the layers before it, it would shrink with the depth.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from ofe.report.plots.common import (
    ATTENTION_LAYER_NOTE, ATTENTION_SITES, LEGEND_NOTE, MASSIVE_DEF, MASSIVE_LAYER_NOTE, MASSIVE_SITES, SINK_DEF,
    WIDE_HEIGHT, WIDE_WIDTH, chart_title, no_data, select_metric, thin_steps,
)
from ofe.report.plots.layers import final_per_layer
from ofe.report.plots.seeds import SEEDS_LEGEND_NOTE, band_note, configuration_lines, has_replicates, value_y

SINK_MEAN_NOTE = (
    "y: mean over layers, Gu et al.'s sink rate of the whole model (the share over sequences, layers and "
    "heads: every layer has as many heads)"
)
MASSIVE_MAX_NOTE = (
    "y: the largest over layers (the stream entering each block and the last block's output), log scale: a "
    "massive activation lives in a few layers, from where it appears on (Sun et al.); a mean over layers "
    "would dilute it"
)
COMPLETE_NOTE = "a step where some layer's value is not finite is left out"


def final_layer_sink_rate(metrics: pd.DataFrame, width: int = WIDE_WIDTH) -> alt.Chart | alt.LayerChart:
    """Sink rate against layer at each run's last logged (finite) step; colour = label, 0-100% axis."""
    return final_per_layer(
        metrics, "sink_rate", "sink rate", "Attention-sink rate per layer at the end of training",
        [SINK_DEF, ATTENTION_LAYER_NOTE], log=False, width=width, sites=ATTENTION_SITES, share=True,
    )


def final_layer_massive_ratio(metrics: pd.DataFrame, width: int = WIDE_WIDTH) -> alt.Chart | alt.LayerChart:
    """Massive ratio against layer at each run's last logged (finite) step; colour = label, log y."""
    return final_per_layer(
        metrics, "massive_ratio", "top-1 |h| / median |h|", "Massive activations per layer at the end of training",
        [MASSIVE_DEF, MASSIVE_LAYER_NOTE], log=True, width=width, sites=MASSIVE_SITES,
    )


def sink_rate_over_steps(metrics: pd.DataFrame, width: int = WIDE_WIDTH) -> alt.Chart | alt.LayerChart:
    """Sink rate averaged over layers against step; colour = label, 0-100% axis."""
    return _over_steps(
        metrics, "sink_rate", ATTENTION_SITES, "mean", "Attention-sink rate over training",
        [SINK_DEF, SINK_MEAN_NOTE], value_y("sink rate, mean over layers", share=True), width, log=False,
    )


def massive_ratio_over_steps(metrics: pd.DataFrame, width: int = WIDE_WIDTH) -> alt.Chart | alt.LayerChart:
    """The largest massive ratio over layers against step; colour = label, log y."""
    return _over_steps(
        metrics, "massive_ratio", MASSIVE_SITES, "max", "Massive activations over training",
        [MASSIVE_DEF, MASSIVE_MAX_NOTE], value_y("top-1 |h| / median |h|, max over layers", log=True), width,
        log=True,
    )


def over_layers(df: pd.DataFrame, how: str, log: bool = False) -> pd.DataFrame:
    """One row per run and step of one metric's rows (`select_metric`): `value` = `how` ("mean", "max")
    over its layers and sites, at the steps where every layer's value is finite (and positive, for a
    log axis); without the layer and site columns."""
    plottable = pd.Series(np.isfinite(df["value"].to_numpy(dtype=float)), index=df.index)
    if log:
        plottable &= df["value"] > 0
    df = df[plottable.groupby([df["run_id"], df["step"]]).transform("all")]
    keys = [c for c in df.columns if c not in ("layer", "site", "value")]
    return df.groupby(keys, dropna=False, sort=False)["value"].agg(how).reset_index()


def _over_steps(
    metrics: pd.DataFrame, metric: str, sites: tuple[str, ...], how: str, title_text: str, notes: list[str],
    y: dict, width: int, log: bool,
) -> alt.Chart | alt.LayerChart:
    """`metric` at `sites` reduced over layers by `how` per run and step (`over_layers`), against step."""
    df = select_metric(metrics, metric, sites, finite_only=False)
    if not df.empty:
        df = thin_steps(over_layers(df, how, log))
    seeds = not df.empty and has_replicates(df)
    notes = notes + [COMPLETE_NOTE] + ([SEEDS_LEGEND_NOTE, band_note(df)] if seeds else [LEGEND_NOTE])
    title = chart_title(title_text, notes, width)
    if df.empty:
        return no_data(title)
    chart = configuration_lines(df, alt.X("step:Q", title="step"), ["step"], y, point=False,
                                measures=["step", "tokens", "value"])
    return chart.properties(title=title, width=width, height=WIDE_HEIGHT)
