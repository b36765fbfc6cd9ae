"""What every chart of the report shares: the metric definitions its subtitles quote, the selection and
thinning of the tidy metrics table, tooltips, titles and the "no data" chart.

The figure families (`plots.layers`, `plots.loss`, `plots.sweep`, `plots.int8`) build on these; `plots`
gathers the public functions in one namespace.
"""

from __future__ import annotations

import textwrap

import altair as alt
import numpy as np
import pandas as pd

# Where the paper's kurtosis curves are measured: the residual stream entering each block (layers
# 0..L-1) and the tensor actually fed to the unembedding, after any final norm (layer L).
LAYER_SITES = ("block_input", "unembed_input")

# Where the probe logs the massive activations (`ofe.core.metrics.MASSIVE_SITES`: the stream entering
# each block, and the last block's output before any final norm at layer L) and the attention metrics.
MASSIVE_SITES = ("block_input", "unembed_input_pre_norm")
ATTENTION_SITES = ("attention",)

# Columns that describe a measurement rather than a run's configuration.
MEASURE_COLUMNS = frozenset({"run_id", "label", "step", "tokens", "layer", "site", "metric", "value"})
REPLICATE_AXES = ("seed",)  # averaged over, never an x axis or a colour

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
SINK_DEF = (
    "sink rate = share of heads (over the probe's sequences) whose mean attention weight on the first token, "
    "over all queries, exceeds ε = 0.3 (Gu et al. 2024)"
)
MASSIVE_DEF = (
    "massive ratio = top-1 |h| of the residual stream over its median |h|, each over a sequence's tokens and "
    "channels, averaged over sequences (Sun et al. 2024)"
)
MASSIVE_LAYER_NOTE = (
    "layer l < L: residual stream entering block l; layer L: the last block's output, before any final norm"
)
ATTENTION_LAYER_NOTE = "layer l: the attention of block l"
LEGEND_NOTE = "one line per run, colour = configuration; click a legend entry to highlight it"
MEAN_KURTOSIS_DEF = "Kurt averaged over layers at the run's last logged step"
LAYER_NOTE = "layer l < L: residual stream entering block l; layer L: input to the unembedding (after any final norm)"

TOOLTIP_FORMATS = {
    "value": ".4~g", "ppl_fp": ".4~f", "ppl_q": ".4~f", "mean_kurtosis": ".4~g", "peak_kurtosis": ".4~g",
    "degradation": ".3~%",
}


def select_metric(
    metrics: pd.DataFrame, metric: str, sites: tuple[str, ...], finite_only: bool = True
) -> pd.DataFrame:
    """Rows of one metric at the given sites (finite values only, unless told), without the metric column."""
    if metrics.empty or not {"metric", "site", "value"} <= set(metrics.columns):
        return pd.DataFrame()
    df = metrics[(metrics["metric"] == metric) & metrics["site"].isin(sites)]
    if finite_only:
        df = df[np.isfinite(df["value"].to_numpy(dtype=float))]
    if "label" not in df.columns:  # called outside the report: each run is its own group
        df = df.assign(label=df["run_id"])
    return df.drop(columns=["metric"]).reset_index(drop=True)


def positive(df: pd.DataFrame) -> pd.DataFrame:
    """Drop values a log scale cannot show."""
    return df[df["value"] > 0] if not df.empty else df


def thin_steps(df: pd.DataFrame, max_steps: int = MAX_STEPS_PER_RUN) -> pd.DataFrame:
    """Keep at most about `max_steps` evenly strided logged steps per run, always including the last."""
    if df.empty:
        return df
    by_run = df.groupby("run_id")["step"]
    rank = by_run.rank(method="dense").astype(int) - 1
    n_steps = by_run.transform("nunique")
    stride = np.ceil(n_steps / max_steps).astype(int)
    return df[(rank % stride == 0) | (rank == n_steps - 1)]


def vl_field(name: str) -> str:
    """A column name as a Vega-Lite field: dots and brackets mean nested access there, so escape them."""
    for char in "\\.[]":
        name = name.replace(char, "\\" + char)
    return name


def tooltips(
    df: pd.DataFrame, measures: list[str], measure_columns: frozenset[str] = MEASURE_COLUMNS
) -> list[alt.Tooltip]:
    """run_id, label (if any), every configuration column of `df`, then the given measurement columns."""
    config = [c for c in df.columns if c not in measure_columns]
    out = [alt.Tooltip("run_id:N", title="run")]
    if "label" in df.columns:
        out.append(alt.Tooltip("label:N", title="label"))
    return out + column_tooltips(df, config + [m for m in measures if m in df.columns])


def column_tooltips(df: pd.DataFrame, columns: list[str], titles: dict[str, str] | None = None) -> list[alt.Tooltip]:
    """One tooltip per column of `df`: quantitative for numbers, nominal otherwise; `titles` renames some."""
    titles = titles or {}
    out = []
    for column in columns:
        numeric = pd.api.types.is_numeric_dtype(df[column]) and not pd.api.types.is_bool_dtype(df[column])
        out.append(
            alt.Tooltip(
                field=vl_field(column),
                type="quantitative" if numeric else "nominal",
                title=titles.get(column, column),
                format=TOOLTIP_FORMATS.get(column, alt.Undefined),
            )
        )
    return out


def label_color(legend: dict | None = None) -> alt.Color:
    """Colour = configuration (`label`); `legend` adds legend properties. tableau20, not Vega's default
    category10: a study such as configs/attention.yaml has 14 configurations, and ten colours would give
    two configurations one colour."""
    return alt.Color("label:N", title="configuration", scale=alt.Scale(scheme="tableau20"),
                     legend=alt.Legend(labelLimit=300, **(legend or {})))


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
