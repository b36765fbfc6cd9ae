"""The attention-sink and massive-activation figures (issue 23) against values computed here with numpy
from planted numbers: per layer at the end of training and over training, seeds as bands, the checkpoint
studies' sink rate against step; and the figures appear in a section only where its tables carry the
metrics (results from before them render as before)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import vl_convert

from ofe.io import write_parquet
from ofe.report import plots
from ofe.report.page import build_report
from ofe.report.plots import ckpt as plots_ckpt
from ofe.report.sections import FIGURES, study_figures
from tests.helpers.report_html import chart_specs, page_section, spec_values
from tests.unit.report.test_report_ckpt import (
    CKPT_IDS, CKPTS, COMPLETED, SCHEMAS, STUDY_META, _checkpoint_tables, _write,
)
from tests.unit.report.test_report_seeds import _check_band, _colour_legend_answers_clicks, _marks

SEEDS = 3
STEPS = (0, 10, 20)
N_LAYERS = 2  # attention at layers 0..1; the massive ratio at block_input 0..1 and unembed_input_pre_norm 2
MASSIVE = [(layer, "block_input") for layer in range(N_LAYERS)] + [(N_LAYERS, "unembed_input_pre_norm")]
MULTI, SINGLE = "attention=gated", "attention=softmax"  # configurations: three seeds, one seed
DECOY = 1e9  # massive_ratio at unembed_input (after the final norm): no figure may show it
RNG = np.random.default_rng(23)
# Planted [seed, step, layer] of the three-seed configuration; [step, layer] of the one-seed one.
SINK = RNG.uniform(0.0, 1.0, size=(SEEDS, len(STEPS), N_LAYERS))
RATIO = RNG.uniform(5.0, 5000.0, size=(SEEDS, len(STEPS), len(MASSIVE)))
SINK_SINGLE, RATIO_SINGLE = SINK[0] / 2, RATIO[0] * 3


def _metrics(seeds: int = SEEDS, new_metrics: bool = True) -> pd.DataFrame:
    """Kurtosis and loss (as every run logs), and unless told otherwise the sink rate and massive ratio,
    of the three-seed configuration (or its first `seeds` seeds) and the one-seed one, with a `label`."""
    rows = []

    def add(attention: str, seed: int, step: int, layer: int, site: str, metric: str, value: float) -> None:
        rows.append({"run_id": f"{attention}/seed{seed}", "attention": attention, "seed": seed,
                     "label": f"attention={attention}", "step": step, "tokens": 256 * step, "layer": layer,
                     "site": site, "metric": metric, "value": float(value)})

    runs = [("gated", seed, SINK[seed], RATIO[seed]) for seed in range(seeds)] + [("softmax", 0, SINK_SINGLE,
                                                                                   RATIO_SINGLE)]
    for attention, seed, sink, ratio in runs:
        for s, step in enumerate(STEPS):
            for layer in range(N_LAYERS + 1):
                add(attention, seed, step, layer, "block_input" if layer < N_LAYERS else "unembed_input",
                    "kurtosis", 2.0 + layer)
            add(attention, seed, step, -1, "train", "loss", 3.0 - step / 100)
            if not new_metrics:
                continue
            for layer in range(N_LAYERS):
                add(attention, seed, step, layer, "attention", "sink_rate", sink[s, layer])
                add(attention, seed, step, layer, "attention", "attention_entropy", 2.0)
            for i, (layer, site) in enumerate(MASSIVE):
                add(attention, seed, step, layer, site, "massive_ratio", ratio[s, i])
            add(attention, seed, step, N_LAYERS, "unembed_input", "massive_ratio", DECOY)
    return pd.DataFrame(rows)


# ---- the charts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("chart, planted, single, layers", [
    (plots.final_layer_sink_rate, SINK, SINK_SINGLE, list(range(N_LAYERS))),
    (plots.final_layer_massive_ratio, RATIO, RATIO_SINGLE, [layer for layer, _ in MASSIVE]),
])
def test_final_per_layer_charts_hold_the_planted_last_step_with_seed_bands(chart, planted, single, layers) -> None:
    spec = chart(_metrics()).to_dict()
    assert _marks(spec) == ["area", "line"]
    rows = {(r["label"], r["layer"]): r for r in spec_values(spec)}
    assert set(rows) == {(label, layer) for label in (MULTI, SINGLE) for layer in layers}  # no decoy, no layer twice
    for i, layer in enumerate(layers):
        _check_band(rows[(MULTI, layer)], planted[:, -1, i])  # band = min-max over the planted seeds
        assert rows[(SINGLE, layer)]["value"] == pytest.approx(single[-1, i])
        assert rows[(SINGLE, layer)]["n"] == 1
    assert all(r["value"] < DECOY for r in rows.values())
    subtitle = " ".join(spec["title"]["subtitle"])
    assert "band = min-max over 3 seeds" in subtitle
    assert _colour_legend_answers_clicks(spec)
    assert "<svg" in vl_convert.vegalite_to_svg(spec)


def test_sink_rate_is_a_share_and_the_massive_ratio_log_scaled_with_their_definitions() -> None:
    sink = plots.final_layer_sink_rate(_metrics()).to_dict()
    y = sink["layer"][1]["encoding"]["y"]
    assert y["scale"] == {"domain": [0, 1]} and y["axis"] == {"format": "%"}
    subtitle = " ".join(sink["title"]["subtitle"])
    assert "Gu et al. 2024" in subtitle and "ε = 0.3" in subtitle and "share of heads" in subtitle
    massive = plots.final_layer_massive_ratio(_metrics()).to_dict()
    assert massive["layer"][1]["encoding"]["y"]["scale"] == {"type": "log"}
    subtitle = " ".join(massive["title"]["subtitle"])
    assert "Sun et al. 2024" in subtitle and "top-1 |h|" in subtitle and "median |h|" in subtitle
    assert "before any final norm" in subtitle


@pytest.mark.parametrize("chart, planted, single, reduce, why", [
    (plots.sink_rate_over_steps, SINK, SINK_SINGLE, np.mean, "mean over layers, Gu et al.'s sink rate"),
    (plots.massive_ratio_over_steps, RATIO, RATIO_SINGLE, np.max, "the largest over layers"),
])
def test_over_steps_charts_reduce_layers_then_band_the_seeds(chart, planted, single, reduce, why) -> None:
    spec = chart(_metrics()).to_dict()
    assert _marks(spec) == ["area", "line"]
    rows = {(r["label"], r["step"]): r for r in spec_values(spec)}
    assert set(rows) == {(label, step) for label in (MULTI, SINGLE) for step in STEPS}
    for s, step in enumerate(STEPS):
        per_seed = reduce(planted[:, s, :], axis=1)  # one number per seed: its layers reduced
        _check_band(rows[(MULTI, step)], per_seed)
        assert rows[(SINGLE, step)]["value"] == pytest.approx(reduce(single[s]))
    assert spec["layer"][0]["encoding"]["x"]["field"] == "step"
    subtitle = " ".join(spec["title"]["subtitle"])
    assert why in subtitle and "band = min-max over 3 seeds" in subtitle
    assert _colour_legend_answers_clicks(spec)
    assert "<svg" in vl_convert.vegalite_to_svg(spec)


@pytest.mark.parametrize("chart", [plots.final_layer_sink_rate, plots.final_layer_massive_ratio,
                                   plots.sink_rate_over_steps, plots.massive_ratio_over_steps])
def test_one_seed_per_configuration_draws_one_line_per_run(chart) -> None:
    spec = chart(_metrics(seeds=1)).to_dict()
    assert "area" not in _marks(spec)
    assert all("min" not in row for row in spec_values(spec))
    assert {row["run_id"] for row in spec_values(spec)} == {"gated/seed0", "softmax/seed0"}
    assert "band" not in " ".join(spec["title"]["subtitle"])


def test_a_step_with_a_non_finite_layer_is_left_out() -> None:
    """A diverging seed: its last step's sink rate is NaN in layer 1. Per layer it falls back to its last
    complete step; over training that step has the two other seeds only."""
    metrics = _metrics()
    broken = (metrics["run_id"] == "gated/seed2") & (metrics["metric"] == "sink_rate") & (metrics["step"] == 20)
    metrics.loc[broken & (metrics["layer"] == 1), "value"] = math.nan
    final = {r["layer"]: r for r in spec_values(plots.final_layer_sink_rate(metrics).to_dict()) if r["label"] == MULTI}
    for layer in range(N_LAYERS):
        _check_band(final[layer], np.array([SINK[0, -1, layer], SINK[1, -1, layer], SINK[2, -2, layer]]))
    steps = {r["step"]: r for r in spec_values(plots.sink_rate_over_steps(metrics).to_dict()) if r["label"] == MULTI}
    _check_band(steps[20], SINK[:2, -1, :].mean(axis=1))
    _check_band(steps[10], SINK[:, 1, :].mean(axis=1))


@pytest.mark.parametrize("chart", [plots.final_layer_sink_rate, plots.final_layer_massive_ratio,
                                   plots.sink_rate_over_steps, plots.massive_ratio_over_steps])
def test_without_the_metrics_a_chart_says_no_data(chart) -> None:
    for frame in (pd.DataFrame(), _metrics(new_metrics=False)):
        spec = chart(frame).to_dict()
        assert spec["mark"]["type"] == "text" and spec_values(spec) == [{"text": "no data"}]


def test_a_study_gets_the_figures_of_the_metrics_it_carries() -> None:
    old = [slug for slug, _ in FIGURES]
    assert [slug for slug, _ in study_figures(_metrics(new_metrics=False))] == old
    assert [slug for slug, _ in study_figures(pd.DataFrame())] == old
    new = [slug for slug, _ in study_figures(_metrics())]
    assert new == [*old[:-1], "final-layer-sink-rate", "final-layer-massive-ratio", "sink-rate-over-steps",
                   "massive-ratio-over-steps", "loss-curves"]
    sinks_only = _metrics()[lambda df: df["metric"] != "massive_ratio"]
    assert [slug for slug, _ in study_figures(sinks_only)] == [
        *old[:-1], "final-layer-sink-rate", "sink-rate-over-steps", "loss-curves"]


# ---- the page: a study with the new metrics beside one from before them ---------------------------

@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("sinks")
    old = _metrics(new_metrics=False)
    old = old.assign(run_id="old/" + old["run_id"], attention="old_" + old["attention"])
    metrics = pd.concat([_metrics(), old], ignore_index=True).drop(columns="label")
    runs = metrics.drop_duplicates("run_id")[["run_id", "attention", "seed"]].assign(
        studies=lambda df: [["old"] if r.startswith("old/") else ["attention"] for r in df["run_id"]],
        status="completed", final_val_loss=2.9, peak_kurtosis=4.0, final_mean_kurtosis=3.0, tokens_per_s=1e4,
        wall_s=10.0, error=None)
    meta = {"studies": {"attention": {"title": "Attention variants", "question": "Which variant sinks?",
                                      "axes": ["attention", "seed"]},
                        "old": {"title": "Older results", "question": "?", "axes": ["attention", "seed"]}},
            "grid_columns": ["attention", "seed"], "provenance": {}}
    write_parquet(runs.reset_index(drop=True), root / "runs.parquet", metadata=meta)
    write_parquet(metrics, root / "metrics.parquet", metadata=meta)
    return build_report(root, root / "reports" / "index.html", png=False).read_text()


def test_the_study_with_the_metrics_shows_their_figures_with_planted_values(page: str) -> None:
    section = page_section(page, "study-attention")
    specs = chart_specs(section)
    assert list(specs) == [
        "fig-attention-kurtosis-over-steps", "fig-attention-final-layer-kurtosis",
        "fig-attention-final-layer-token-correlation", "fig-attention-final-layer-mmr",
        "fig-attention-final-layer-sink-rate", "fig-attention-final-layer-massive-ratio",
        "fig-attention-sink-rate-over-steps", "fig-attention-massive-ratio-over-steps", "fig-attention-loss-curves",
    ]
    rows = {(r["label"], r["layer"]): r for r in spec_values(specs["fig-attention-final-layer-sink-rate"])}
    for layer in range(N_LAYERS):
        _check_band(rows[(MULTI, layer)], SINK[:, -1, layer])
    steps = {(r["label"], r["step"]): r for r in spec_values(specs["fig-attention-massive-ratio-over-steps"])}
    _check_band(steps[(MULTI, 20)], RATIO[:, -1, :].max(axis=1))
    captions = dict(re.findall(r'id="fig-(attention-[^"]+)">.*?<figcaption>(.*?)</figcaption>', section, re.S))
    assert "Gu et al. 2024" in captions["attention-final-layer-sink-rate"]
    assert "Sun et al. 2024" in captions["attention-final-layer-massive-ratio"]
    assert "averaged over layers" in captions["attention-sink-rate-over-steps"]
    assert all("band = min-max over 3 seeds" in caption for caption in captions.values())
    for stem, spec in specs.items():
        assert "<svg" in vl_convert.vegalite_to_svg(spec), stem


def test_a_study_from_before_the_metrics_renders_as_before(page: str) -> None:
    section = page_section(page, "study-old")
    assert list(chart_specs(section)) == [f"fig-old-{slug}" for slug, _ in FIGURES]
    assert "sink" not in section.lower() and "massive" not in section.lower()


# ---- checkpoint studies: sink rate against step ---------------------------------------------------

def _sink_planted() -> dict[tuple[int, int], float]:
    """A sink rate per (completed checkpoint, decoder layer)."""
    rng = np.random.default_rng(5)
    return {(i, layer): float(rng.uniform(0.0, 1.0)) for i in COMPLETED for layer in range(CKPTS[i][4])}


def _ckpt_metrics(planted: dict[tuple[int, int], float], with_sinks: set[int]) -> pd.DataFrame:
    """The checkpoint report tests' metrics table, plus the planted sink rates of the checkpoints in
    `with_sinks` (with decoys at another site and under another name)."""
    base = _checkpoint_tables()["checkpoint_metrics"]
    ids = base.drop_duplicates("ckpt_id").set_index("ckpt_id")
    rows = []
    for (i, layer), value in planted.items():
        if i in with_sinks:
            own = ids.loc[CKPT_IDS[i]].to_dict()
            rows += [{**own, "ckpt_id": CKPT_IDS[i], "layer": layer, "site": "attention", "metric": "sink_rate",
                      "value": value},
                     {**own, "ckpt_id": CKPT_IDS[i], "layer": layer, "site": "attention",
                      "metric": "first_token_attention", "value": 0.99}]
    return pd.concat([base, pd.DataFrame(rows)], ignore_index=True)


def test_checkpoint_sink_rate_is_the_mean_over_layers_against_step_per_model() -> None:
    planted = _sink_planted()
    pythia = {i for i in COMPLETED if "pythia" in CKPTS[i][7]}
    metrics = _ckpt_metrics(planted, pythia)
    spec = plots_ckpt.sink_rate_over_checkpoints(metrics[metrics["ckpt_id"].isin([CKPT_IDS[i] for i in pythia])])
    spec = spec.to_dict()
    got = {(r["label"], r["step"]): (r["value"], r["layers"]) for r in spec_values(spec)}
    want = {(CKPTS[i][1], CKPTS[i][3]): (np.mean([planted[(i, layer)] for layer in range(CKPTS[i][4])]), CKPTS[i][4])
            for i in pythia}
    assert got.keys() == want.keys()
    assert all(got[k][0] == pytest.approx(want[k][0]) and got[k][1] == want[k][1] for k in want)
    encoding = spec["encoding"]
    assert encoding["x"]["field"] == "step" and encoding["x"]["scale"]["type"] == "symlog"
    assert encoding["color"]["field"] == "label" and encoding["color"]["sort"] == ["pythia-14m", "pythia-31m"]
    assert encoding["y"]["scale"] == {"domain": [0, 1]}
    subtitle = " ".join(spec["title"]["subtitle"])
    assert "ε = 0.3" in subtitle and "mean over the decoder layers" in subtitle
    assert "<svg" in vl_convert.vegalite_to_svg(spec)
    # a checkpoint with a non-finite layer is left out, not averaged over its other layers
    broken = metrics.copy()
    broken.loc[(broken["ckpt_id"] == CKPT_IDS[3]) & (broken["metric"] == "sink_rate")
               & (broken["layer"] == 0), "value"] = math.nan
    assert CKPT_IDS[3] not in {r["ckpt_id"] for r in plots_ckpt.sink_rate_points(broken).to_dict("records")}
    assert plots_ckpt.sink_rate_points(_ckpt_metrics(planted, set())).empty
    empty = plots_ckpt.sink_rate_over_checkpoints(pd.DataFrame()).to_dict()
    assert spec_values(empty) == [{"text": "no data"}]


def test_a_checkpoint_study_shows_the_sink_figure_only_with_the_metric(tmp_path: Path) -> None:
    """The "pythia" study's checkpoints carry sink rates, the "local" study's do not (inspected before)."""
    results = tmp_path / "results"
    _write(results, ["pythia", "local"], with_run=False)
    planted = _sink_planted()
    pythia = {i for i in COMPLETED if "pythia" in CKPTS[i][7]}
    meta = {"studies": [STUDY_META["pythia"], STUDY_META["local"]], "grid_columns": [], "provenance": {}}
    write_parquet(_ckpt_metrics(planted, pythia), results / "checkpoint_metrics.parquet",
                  SCHEMAS["checkpoint_metrics"], meta)
    page = build_report(results, tmp_path / "index.html", png=False).read_text()
    specs = chart_specs(page_section(page, "study-pythia"))
    assert list(specs) == ["fig-pythia-kurtosis-over-checkpoints", "fig-pythia-layer-kurtosis-by-checkpoint",
                           "fig-pythia-sink-rate-over-checkpoints", "fig-pythia-int8-over-checkpoints"]
    got = {(r["label"], r["step"]): r["value"] for r in spec_values(specs["fig-pythia-sink-rate-over-checkpoints"])}
    assert got == pytest.approx({(CKPTS[i][1], CKPTS[i][3]): np.mean([planted[(i, layer)]
                                 for layer in range(CKPTS[i][4])]) for i in pythia})
    assert "Gu et al. 2024" in page_section(page, "study-pythia")
    local = page_section(page, "study-local")
    assert "sink-rate" not in local and "sink rate" not in local.lower()
