"""Altair charts of the tidy metrics table (`metrics.parquet`) and of the runs table (`runs.parquet`):
the public functions of every figure family, gathered in one namespace for the report.

Every figure function is pure: it takes the long/tidy metrics DataFrame (columns `run_id`, the grid
columns, `step`, `tokens`, `layer`, `site`, `metric`, `value`, plus a `label` string per run that names
the run's group, e.g. "block=pre_ln") and returns an `alt.Chart` (or layered/faceted chart). No file I/O.
`sweep_lines` takes the runs table instead (one row per run: grid columns, `status`, `peak_kurtosis`,
`final_mean_kurtosis`, ...); the int8 figures (`plots.int8`) take the quantisation table.

Conventions shared by all charts:
- Non-finite values (diverged runs) are dropped before plotting; log-scaled charts also drop values <= 0.
- Every column that is neither a measurement column nor `run_id`/`label` is taken as a run
  configuration (grid) column and shown in tooltips.
- Categorical colours come with a legend-bound selection: clicking a legend entry highlights it.
- A chart whose data is empty renders a "no data" text mark instead of raising.
- Where a configuration has several seeds (runs that differ only in `REPLICATE_AXES`), its curve is the
  mean over the seeds with a min-max band, and the subtitle says over how many; with one seed per
  configuration the charts are one line per run, as without seeds.

Where the families live: `plots.common` (definitions, data selection, tooltips, titles), `plots.seeds`
(seed means and bands), `plots.layers` (per-layer kurtosis, signal propagation, max-median ratio),
`plots.sinks` (attention-sink rate and massive activations, per layer and over training), `plots.loss`,
`plots.sweep`, `plots.int8`, `plots.ckpt` (checkpoint studies).
"""

from __future__ import annotations

from ofe.report.plots.common import FACET_COLUMNS, LAYER_SITES, REPLICATE_AXES, chart_title, no_data
from ofe.report.plots.layers import (final_layer_kurtosis, final_layer_mmr, final_layer_token_correlation,
                                     kurtosis_over_steps)
from ofe.report.plots.loss import loss_curves
from ofe.report.plots.sinks import (final_layer_massive_ratio, final_layer_sink_rate, massive_ratio_over_steps,
                                    sink_rate_over_steps)
from ofe.report.plots.sweep import log_axis, sweep_lines, sweep_points

__all__ = [
    "FACET_COLUMNS", "LAYER_SITES", "REPLICATE_AXES", "chart_title", "final_layer_kurtosis", "final_layer_massive_ratio",
    "final_layer_mmr", "final_layer_sink_rate", "final_layer_token_correlation", "kurtosis_over_steps", "log_axis",
    "loss_curves", "massive_ratio_over_steps", "no_data", "sink_rate_over_steps", "sweep_lines", "sweep_points",
]
