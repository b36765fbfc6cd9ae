"""The int8 figures: relative perplexity degradation after quantisation against kurtosis (Spearman's
rank correlation and its n per bit width) and against validation loss (configurations at equal loss).
Pure functions of the quantisation table (`quant.parquet`, one row per run, protocol and bit width)."""

from __future__ import annotations

import math

import altair as alt
import numpy as np
import pandas as pd

from ofe.report.plots.common import FADED, MEAN_KURTOSIS_DEF, WIDE_HEIGHT, WIDE_WIDTH, chart_title, no_data, tooltips

DEGRADATION_DEF = "relative degradation = ppl_q / ppl_fp - 1 (validation perplexity after / before quantisation)"
SPEARMAN_DEF = "Spearman ρ = Pearson correlation of the ranks (ties averaged), per bit width"
MIN_SPEARMAN_N = 3  # fewer runs than this give "n/a": two points always correlate perfectly
SYMLOG_CONSTANT = 0.01  # a symlog degradation axis is linear within +-1 %
PROTOCOL_NAMES = {"static_per_tensor": "static per-tensor", "dynamic_per_token": "dynamic per-token",
                  "torchao_dynamic": "torchao dynamic per-token, real int8 kernels"}
PROTOCOL_NOTES = {
    "static_per_tensor": (
        "static per-tensor: weights and activations (linear inputs and outputs, attention scores and "
        "probabilities, norm outputs, residual stream) with per-tensor ranges calibrated on training "
        "batches; the paper's likely W8A8 protocol"
    ),
    "dynamic_per_token": (
        "dynamic per-token: per-channel weights, per-token dynamic ranges on linear-layer inputs only "
        "(SmoothQuant's forgiving fake quantisation)"
    ),
    "torchao_dynamic": (
        "torchao dynamic: dynamic per-token's recipe (absmax weights) run by torchao's int8 kernels, "
        "int8 x int8 matmuls with int32 accumulation: the real-kernel check of the simulation"
    ),
}
# Columns of the quantisation table that describe a measurement rather than a run's configuration.
_QUANT_MEASURE_COLUMNS = frozenset(
    {"run_id", "label", "studies", "protocol", "bits", "ppl_fp", "ppl_q", "delta", "degradation",
     "mean_kurtosis", "peak_kurtosis", "status", "final_val_loss"}
)


def quant_degradation_scatter(quant: pd.DataFrame, protocol: str = "static_per_tensor") -> alt.Chart:
    """Relative perplexity degradation after quantisation against mean kurtosis, one point per run and
    bit width (colour and shape = bits), for one protocol; the subtitle gives Spearman's rho per bit width.

    x: the run's Kurt averaged over layers at its last logged step (log scale). y: ppl_q / ppl_fp - 1,
    log scale when every plotted value is positive, else symlog (linear within +-SYMLOG_CONSTANT).
    Runs without finite perplexities (diverged) or kurtosis are left out.
    """
    points = quant_points(quant, protocol)
    title_text = f"Quantisation degradation against kurtosis ({PROTOCOL_NAMES.get(protocol, protocol)})"
    notes = [PROTOCOL_NOTES.get(protocol, f"protocol {protocol}"), f"x: {MEAN_KURTOSIS_DEF}; log scale"]
    if points.empty:
        return no_data(chart_title(title_text, notes))
    # A log axis cannot show runs that quantisation leaves unchanged or improves; symlog can.
    log_y = bool((points["degradation"] > 0).all())
    if log_y:
        y_scale, y_note = alt.Scale(type="log"), "log scale"
    else:
        y_scale = alt.Scale(type="symlog", constant=SYMLOG_CONSTANT)
        y_note = f"symlog scale (linear within ±{SYMLOG_CONSTANT:.0%}, logarithmic beyond: some runs do not degrade)"
    notes.append(f"y: {DEGRADATION_DEF}; {y_note}")
    rhos = degradation_spearman(quant, protocol)
    notes.append(
        "Spearman ρ(Kurt, degradation): "
        + "; ".join(f"{_bits_name(b)} ρ = {_rho_text(rho)} (n = {n})" for b, (rho, n) in rhos.items())
    )
    notes.append(f"{SPEARMAN_DEF}; one point per run and bit width; click a bit width in the legend")
    shown = [c for c in points.columns if c not in ("studies", "protocol", "delta", "status")]
    points = points[shown]
    pick = alt.selection_point(fields=["bits"], bind="legend")
    bits_legend = alt.Legend(title="bits (W = A)")
    # Every bit width of the table (not just this protocol's) in the domain: a bit width keeps its
    # colour and shape from one protocol's chart to the next.
    bits_domain = sorted({int(b) for b in quant["bits"]}, reverse=True)
    return (
        alt.Chart(points)
        .mark_point(filled=True, size=70)
        .encode(
            x=alt.X("mean_kurtosis:Q", title="mean Kurt over layers", scale=alt.Scale(type="log")),
            y=alt.Y(
                "degradation:Q",
                title="relative degradation ppl_q / ppl_fp - 1",
                scale=y_scale,
                axis=alt.Axis(format="~%"),
            ),
            # Nominal, ordered by the domain: a shape on an ordinal field makes Vega-Lite warn.
            color=alt.Color("bits:N", scale=alt.Scale(scheme="dark2", domain=bits_domain), legend=bits_legend),
            shape=alt.Shape("bits:N", scale=alt.Scale(domain=bits_domain), legend=bits_legend),
            opacity=alt.condition(pick, alt.value(0.9), alt.value(FADED)),
            tooltip=tooltips(
                points,
                ["bits", "mean_kurtosis", "peak_kurtosis", "ppl_fp", "ppl_q", "degradation"],
                measure_columns=_QUANT_MEASURE_COLUMNS,
            ),
        )
        .add_params(pick)
        .properties(title=chart_title(title_text, notes), width=WIDE_WIDTH, height=WIDE_HEIGHT)
    )


def quant_points(quant: pd.DataFrame, protocol: str, need_kurtosis: bool = True) -> pd.DataFrame:
    """The plottable rows of one protocol, with `degradation` = ppl_q / ppl_fp - 1 added: finite
    perplexities (ppl_fp > 0) and, if `need_kurtosis`, a finite, positive mean kurtosis (the x axis of
    the kurtosis scatter is log-scaled)."""
    needed = {"protocol", "bits", "ppl_fp", "ppl_q", "mean_kurtosis"}
    if quant is None or quant.empty or not needed <= set(quant.columns):
        return pd.DataFrame()
    df = quant[quant["protocol"] == protocol]
    ppl_fp = df["ppl_fp"].to_numpy(dtype=float)
    ppl_q = df["ppl_q"].to_numpy(dtype=float)
    kurt = df["mean_kurtosis"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        degradation = ppl_q / ppl_fp - 1.0
    ok = np.isfinite(degradation) & (ppl_fp > 0)
    if need_kurtosis:
        ok &= np.isfinite(kurt) & (kurt > 0)
    return df.assign(degradation=degradation)[ok].reset_index(drop=True)


def degradation_spearman(quant: pd.DataFrame, protocol: str) -> dict[int, tuple[float, int]]:
    """bits -> (Spearman's rho between mean kurtosis and relative degradation, number of runs) over the
    plottable rows of one protocol (`quant_points`), in decreasing bit width."""
    points = quant_points(quant, protocol)
    if points.empty:
        return {}
    out = {}
    for bits, group in sorted(points.groupby("bits"), key=lambda item: -item[0]):
        out[int(bits)] = (spearman(group["mean_kurtosis"], group["degradation"]), len(group))
    return out


def spearman(x: pd.Series | np.ndarray, y: pd.Series | np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's correlation of the (average-tied) ranks of the finite pairs.

    NaN when fewer than MIN_SPEARMAN_N pairs remain or either side is constant.
    """
    x = pd.Series(np.asarray(x, dtype=float))
    y = pd.Series(np.asarray(y, dtype=float))
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < MIN_SPEARMAN_N:
        return math.nan
    rx, ry = x[ok].rank(method="average"), y[ok].rank(method="average")
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else math.nan


def _bits_name(bits: int) -> str:
    return f"W{bits}A{bits}"


def _rho_text(rho: float) -> str:
    return "n/a" if not math.isfinite(rho) else f"{rho:.2f}"


def degradation_against_loss(quant: pd.DataFrame, protocol: str, bits: int, config_columns: list[str]) -> alt.Chart:
    """Relative degradation after `protocol` at `bits` against the run's final validation loss, one point
    per run, colour = configuration (`config_columns` joined, seeds excepted)."""
    title_text = f"{_bits_name(bits)} {PROTOCOL_NAMES.get(protocol, protocol)}: degradation against validation loss"
    points = quant_points(quant, protocol, need_kurtosis=False)
    if not points.empty:
        points = points[(points["bits"] == bits) & np.isfinite(points["final_val_loss"].astype(float))]
    notes = [f"y: {DEGRADATION_DEF}", "x: final validation loss (mean over the evaluation batches)",
             "one point per run, colour = configuration; compare configurations at equal x"]
    if points.empty:
        return no_data(chart_title(title_text, notes))
    columns = [c for c in config_columns if c in points.columns]
    label = points[columns].astype(str).agg(" ".join, axis=1) if columns else pd.Series("all runs", index=points.index)
    points = points.assign(label=label)[
        ["run_id", "label", "final_val_loss", "degradation", "ppl_fp", "ppl_q", "mean_kurtosis"]]
    pick = alt.selection_point(fields=["label"], bind="legend")
    return (
        alt.Chart(points)
        .mark_point(filled=True, size=70)
        .encode(
            x=alt.X("final_val_loss:Q", title="final validation loss", scale=alt.Scale(zero=False)),
            y=alt.Y("degradation:Q", title="relative degradation ppl_q / ppl_fp - 1",
                    scale=alt.Scale(type="symlog", constant=SYMLOG_CONSTANT), axis=alt.Axis(format="~%")),
            color=alt.Color("label:N", title="configuration", legend=alt.Legend(labelLimit=300)),
            opacity=alt.condition(pick, alt.value(0.9), alt.value(FADED)),
            tooltip=tooltips(points, ["final_val_loss", "degradation", "ppl_fp", "ppl_q", "mean_kurtosis"],
                             measure_columns=_QUANT_MEASURE_COLUMNS),
        )
        .add_params(pick)
        .properties(title=chart_title(title_text, notes), width=WIDE_WIDTH, height=WIDE_HEIGHT)
    )
