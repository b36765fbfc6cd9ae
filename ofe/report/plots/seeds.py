"""Seeds drawn as bands: where a configuration was trained with several seeds, its curve is the mean
over the seeds, with a band from their minimum to their maximum, instead of one line per run.

A configuration is a set of runs whose `label` and configuration columns agree on everything but the
replicate axes (`REPLICATE_AXES`: the seed). A chart with one seed per configuration draws no band, and
its figure function builds exactly the chart it would without this module.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

from ofe.report.plots.common import FADED, MEASURE_COLUMNS, REPLICATE_AXES, column_tooltips, label_color, tooltips

BAND_OPACITY = 0.2  # a band under its mean line: visible, without hiding the other configurations
# Columns a seed summary adds: the mean (as `value`, the y of the line), the band's ends, the seed count
# and a number per configuration (what tells its lines apart).
SUMMARY_COLUMNS = frozenset({"value", "min", "max", "n", "config"})
# The colour legend of a chart with bands: without an explicit symbol opacity, Vega-Lite takes the band's
# (faint) for the legend's symbols and the legend stops picking configurations when clicked.
BAND_LEGEND = {"symbolOpacity": 1}
SEEDS_LEGEND_NOTE = "one line per configuration, colour = configuration; click a legend entry to highlight it"
SUMMARY_TITLES = {"value": "mean over seeds", "min": "min over seeds", "max": "max over seeds", "n": "seeds"}


def configuration_keys(df: pd.DataFrame, measure_columns: frozenset[str] = MEASURE_COLUMNS) -> list[str]:
    """The columns that name a configuration: `label` and every configuration column but the seed."""
    config = [c for c in df.columns if c not in measure_columns and c not in REPLICATE_AXES]
    return ["label", *config] if "label" in df.columns else config


def seeds_per_configuration(df: pd.DataFrame, measure_columns: frozenset[str] = MEASURE_COLUMNS) -> pd.Series:
    """How many runs (seeds) each configuration of `df` has."""
    keys = configuration_keys(df, measure_columns)
    if df.empty:
        return pd.Series(dtype=int)
    if not keys:  # no configuration column at all: every run is one configuration
        return pd.Series([df["run_id"].nunique()])
    return df.groupby(keys, dropna=False, sort=False)["run_id"].nunique()


def has_replicates(df: pd.DataFrame, measure_columns: frozenset[str] = MEASURE_COLUMNS) -> bool:
    """Whether some configuration of `df` has more than one run."""
    counts = seeds_per_configuration(df, measure_columns)
    return bool(len(counts)) and int(counts.max()) > 1


def seeds_text(counts: pd.Series) -> str | None:
    """The seed count of the configurations with several seeds, as "3" or as a range "2-3"; None where
    every configuration has one."""
    several = counts[counts > 1]
    if several.empty:
        return None
    lo, hi = int(several.min()), int(several.max())
    return str(lo) if lo == hi else f"{lo}-{hi}"


def band_note(df: pd.DataFrame, measure_columns: frozenset[str] = MEASURE_COLUMNS) -> str:
    """What a band chart's subtitle says of its lines and bands, with the number of seeds."""
    counts = seeds_per_configuration(df, measure_columns)
    note = f"line = mean over seeds, band = min-max over {seeds_text(counts) or 1} seeds"
    return note + ("; a configuration with one seed: its run, no band" if (counts == 1).any() else "")


def seed_summary(df: pd.DataFrame, over: list[str], measure_columns: frozenset[str] = MEASURE_COLUMNS) -> pd.DataFrame:
    """One row per configuration and value of the `over` columns (e.g. layer and step): its configuration
    columns, `value` = the mean of `value` over the seeds, `min`, `max`, `n` = the seeds with a value
    there, and `config`, a number per configuration."""
    keys = configuration_keys(df, measure_columns)
    grouped = df.groupby(keys + over, dropna=False, sort=False)
    out = grouped["value"].agg(["mean", "min", "max"]).rename(columns={"mean": "value"})
    out["n"] = grouped["run_id"].nunique()
    out = out.reset_index()
    out["config"] = out.groupby(keys, dropna=False, sort=False).ngroup() if keys else 0
    return out


def summary_tooltips(summary: pd.DataFrame, over: list[str]) -> list[alt.Tooltip]:
    """label, every configuration column, the `over` columns, then mean, min, max and seed count."""
    config = [c for c in summary.columns if c not in SUMMARY_COLUMNS and c not in over and c != "label"]
    out = [alt.Tooltip("label:N", title="label")] if "label" in summary.columns else []
    columns = config + over + ["value", "min", "max", "n"]
    return out + column_tooltips(summary, columns, SUMMARY_TITLES)


def band_opacity(pick: alt.Parameter) -> dict:
    """A band's opacity: BAND_OPACITY, fainter when another legend entry is picked."""
    return alt.condition(pick, alt.value(BAND_OPACITY), alt.value(BAND_OPACITY * FADED))


def value_y(title: str, log: bool = False, share: bool = False) -> dict:
    """The y encoding's title, scale and axis of `value` (and of a band's `min`): a log scale, a share
    (a fraction on a fixed 0-100% axis) or a linear scale not forced to include 0."""
    scale = alt.Scale(type="log") if log else alt.Scale(domain=[0, 1]) if share else alt.Scale(zero=False)
    return {"title": title, "scale": scale, "axis": alt.Axis(format="%") if share else alt.Undefined}


def configuration_lines(
    df: pd.DataFrame, x: alt.X, over: list[str], y: dict, point: bool, measures: list[str]
) -> alt.Chart | alt.LayerChart:
    """`value` against `x`, colour = configuration (`label`), clicking a legend entry highlighting it:
    one line per run, or where some configuration has several seeds, one line per configuration through
    the mean over its seeds with a min-max band. `over`: the columns a line runs along (its points:
    where the seed mean is taken); `y`: the y encoding's title, scale and axis (`value_y`); `measures`:
    the measurement columns of a run's tooltip. The caller adds the title and size."""
    pick = alt.selection_point(fields=["label"], bind="legend")
    opacity = alt.condition(pick, alt.value(1.0), alt.value(FADED))
    if not has_replicates(df):
        return alt.Chart(df).mark_line(point=point, strokeWidth=1.5).encode(
            x=x,
            y=alt.Y("value:Q", **y),
            color=label_color(),
            detail=alt.Detail("run_id:N"),
            opacity=opacity,
            tooltip=tooltips(df, measures),
        ).add_params(pick)
    summary = seed_summary(df, over)
    band = alt.Chart().mark_area().encode(
        x=x,
        y=alt.Y("min:Q", stack=None, **y),  # stack=None: each band at its own values, unstacked
        y2="max:Q",
        color=label_color(BAND_LEGEND),
        detail=alt.Detail("config:N"),
        opacity=band_opacity(pick),
    )
    line = alt.Chart().mark_line(point=point, strokeWidth=1.5).encode(
        x=x,
        y=alt.Y("value:Q", **y),
        color=label_color(BAND_LEGEND),
        detail=alt.Detail("config:N"),
        opacity=opacity,
        tooltip=summary_tooltips(summary, over),
    ).add_params(pick)
    return alt.layer(band, line, data=summary)
