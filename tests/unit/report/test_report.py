"""The HTML report and its charts, on a small synthetic ablation (no training involved)."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import pytest
import vl_convert

from ofe.__main__ import main
from ofe.io import METRIC_SCHEMA, write_parquet
from ofe.report import plots
from ofe.report.page import build_report, studies
from ofe.report.plots import int8 as plots_int8
from ofe.report.sections import FIGURES, METRIC_FIGURES
from tests.helpers.report_html import chart_specs, page_section, spec_values, table_rows

REVISION = "0123456789abcdef0123456789abcdef01234567"
N_LAYERS = 2
# kurtosis_osp has no figure: the report must keep working beside metrics it does not draw; massive_ratio
# (here at every site: its figures take block_input and unembed_input_pre_norm) and sink_rate bring theirs
LAYER_SITE_METRICS = ("kurtosis", "rms_sq_variance_centred", "max_median_ratio", "token_correlation", "rms",
                      "kurtosis_osp", "massive_ratio")

# (run_id, block, lr, studies, status, error): one completed, one diverged, one missing (never produced metrics).
RUNS = [
    ("tiny/pre_ln/beta1/adamw/lr0.01/seed0", "pre_ln", 0.01, ["blocks", "lr"], "completed", None),
    ("tiny/op/beta0.2/adamw/lr0.01/seed0", "op", 0.01, ["blocks"], "diverged", "loss is nan at step 20"),
    ("tiny/pre_ln/beta1/adamw/lr0.003/seed0", "pre_ln", 0.003, ["lr"], "missing", "Traceback\n<no result>"),
]
# Completed runs in no study, so the int8 table and scatter have enough points: (run_id, block, optimizer).
QUANT_ONLY_RUNS = [
    ("tiny/op/beta0.2/soap/lr0.01/seed0", "op", "soap"),
    ("tiny/post_ln/beta1/soap/lr0.01/seed0", "post_ln", "soap"),
    ("tiny/pre_rms/beta1/adamw/lr0.01/seed0", "pre_rms", "adamw"),
]
# Planted int8 results: run_id -> (mean kurtosis, ppl fp, {(protocol, bits): ppl_q}). Static W8A8
# degradation grows with kurtosis (Spearman 1); static W4A4 swaps the two highest (Spearman 0.8);
# dynamic W8A8 improves one run (a negative degradation, so no log axis). torchao W8A8 (real kernels) sits
# near dynamic W8A8, furthest from it at pre_ln (0.05 / 16 of ppl fp). The diverged run has NaNs.
STATIC, DYNAMIC, TORCHAO, NAN = "static_per_tensor", "dynamic_per_token", "torchao_dynamic", math.nan
QUANT = {
    QUANT_ONLY_RUNS[0][0]: (1.2, 14.71, {(STATIC, 8): 14.87, (STATIC, 4): 22.0, (DYNAMIC, 8): 14.70,
                                         (TORCHAO, 8): 14.72}),
    QUANT_ONLY_RUNS[1][0]: (5.0, 15.5, {(STATIC, 8): 16.0, (STATIC, 4): 31.0, (DYNAMIC, 8): 15.52,
                                        (TORCHAO, 8): 15.53}),
    QUANT_ONLY_RUNS[2][0]: (12.0, 15.8, {(STATIC, 8): 18.0, (STATIC, 4): 94.8, (DYNAMIC, 8): 15.9,
                                         (TORCHAO, 8): 15.88}),
    "tiny/pre_ln/beta1/adamw/lr0.01/seed0": (25.6, 16.0, {(STATIC, 8): 63.4, (STATIC, 4): 64.0, (DYNAMIC, 8): 16.3,
                                                          (TORCHAO, 8): 16.25}),
    "tiny/op/beta0.2/adamw/lr0.01/seed0": (300.0, NAN, dict.fromkeys([(STATIC, 8), (STATIC, 4), (DYNAMIC, 8),
                                                                      (TORCHAO, 8)], NAN)),
}
STUDIES = {
    "blocks": {"title": "Norm blocks", "question": "Does OP avoid outliers?", "axes": ["block"]},
    "lr": {"title": "Learning rate", "question": "Does a higher LR raise kurtosis?", "axes": ["block", "lr"]},
}
GRID = ["block", "scale", "optimizer", "beta", "lr", "seed", "optim.eps"]


def _runs_frame() -> pd.DataFrame:
    rows = []
    extra = [(run_id, block, 0.01, [], "completed", None) for run_id, block, _ in QUANT_ONLY_RUNS]
    optimizers = {run_id: optimizer for run_id, _, optimizer in QUANT_ONLY_RUNS}
    for run_id, block, lr, run_studies, status, error in RUNS + extra:
        done = status != "missing"
        rows.append(
            {
                "run_id": run_id,
                "block": block,
                "scale": "tiny",
                "optimizer": optimizers.get(run_id, "adamw"),
                "beta": 0.2 if block == "op" else 1.0,
                "lr": lr,
                "seed": 0,
                "optim.eps": 1e-8,
                "studies": run_studies,
                "status": status,
                "final_train_loss": 3.1 if done else math.nan,
                "final_val_loss": 3.2 if status == "completed" else math.nan,
                "tokens_per_s": 1.5e4 if done else math.nan,
                "wall_s": 60.0 if done else math.nan,
                "peak_kurtosis": 40.0 if done else math.nan,
                "final_mean_kurtosis": QUANT[run_id][0] if run_id in QUANT else math.nan,
                "steps_done": 20 if done else 0,
                "error": error,
            }
        )
    return pd.DataFrame(rows)


def _metrics_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """Layer metrics at steps 0/10/20, train loss every step, val loss at 10/20; the diverged run ends in NaN/inf."""
    rows = []
    for run in runs[runs["status"] != "missing"].to_dict("records"):
        diverged = run["status"] == "diverged"
        layer_sites = [(layer, "block_input") for layer in range(N_LAYERS)]
        layer_sites += [(N_LAYERS, "unembed_input_pre_norm"), (N_LAYERS, "unembed_input")]
        for step, (layer, site), metric in itertools.product((0, 10, 20), layer_sites, LAYER_SITE_METRICS):
            value = 1.0 + step * (layer + 1)
            if diverged and step == 20:  # blows up in the first layers only
                value = {0: math.inf, 1: math.nan}.get(layer, 1e6)
            rows.append((run, step, layer, site, metric, value))
        for step, layer in itertools.product((0, 10, 20), range(N_LAYERS)):
            rows.append((run, step, layer, "attention", "attention_entropy", 2.0))
            rows.append((run, step, layer, "attention", "sink_rate", 0.5))
        for step in range(21):
            rows.append((run, step, -1, "train", "loss", math.nan if diverged and step == 20 else 5.0 - 0.1 * step))
        for step in (10, 20):
            rows.append((run, step, -1, "val", "loss", 4.0 - 0.01 * step))
    records = [
        {"run_id": r["run_id"], **{c: r[c] for c in GRID}, "step": step, "tokens": step * 256, "layer": layer,
         "site": site, "metric": metric, "value": value}
        for r, step, layer, site, metric, value in rows
    ]
    return pd.DataFrame(records, columns=["run_id", *GRID, *METRIC_SCHEMA.names])


def _quant_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """quant.parquet as `ofe aggregate` writes it: one row per (run, protocol, bits) of the planted QUANT."""
    grid = runs.set_index("run_id")[GRID]
    rows = []
    for run_id, (kurtosis, ppl_fp, ppl_q) in QUANT.items():
        status = runs.set_index("run_id").at[run_id, "status"]
        for (protocol, bits), q in ppl_q.items():
            rows.append({"run_id": run_id, **grid.loc[run_id].to_dict(), "protocol": protocol, "bits": bits,
                         "ppl_fp": ppl_fp, "ppl_q": q, "delta": q - ppl_fp, "mean_kurtosis": kurtosis,
                         "peak_kurtosis": 2 * kurtosis, "status": status})
    return pd.DataFrame(rows).astype({"bits": "int64"})


def _write_results(
    results: Path, runs: pd.DataFrame, metrics: pd.DataFrame, quant: pd.DataFrame | None = None
) -> None:
    meta = {
        "studies": STUDIES,
        "grid_columns": GRID,
        "provenance": {
            "git": {"revision": REVISION, "dirty": False},
            "libraries": {"altair": alt.__version__, "torch": None},
            "python": "3.11.0",
            "machine": {"host": "testhost", "cpus": 2},
            "date": "2025-01-01T00:00:00+00:00",
        },
        "config": {},
    }
    write_parquet(runs, results / "runs.parquet", metadata=meta)
    write_parquet(metrics, results / "metrics.parquet", metadata=meta)
    if quant is not None:
        write_parquet(quant, results / "quant.parquet", metadata=meta)










def _spearman_by_formula(x: list[float], y: list[float]) -> float:
    """Spearman's rho by the textbook formula 1 - 6 sum d^2 / (n (n^2 - 1)), valid without ties."""
    rank_x, rank_y = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    n = len(x)
    return 1 - 6 * float(((rank_x - rank_y) ** 2).sum()) / (n * (n * n - 1))


@pytest.fixture(scope="module")
def synthetic() -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = _runs_frame()
    return runs, _metrics_frame(runs)


@pytest.fixture(scope="module")
def quant(synthetic) -> pd.DataFrame:
    return _quant_frame(synthetic[0])


@pytest.fixture(scope="module")
def report(synthetic, quant, tmp_path_factory) -> Path:
    """The report (SVG and PNG exports) of the synthetic results, in `<tmp>/reports/index.html`; the run
    folders of the runs that produced results exist under `<tmp>/results/runs/`."""
    root = tmp_path_factory.mktemp("report")
    results = root / "results"
    _write_results(results, *synthetic, quant)
    for run_id in synthetic[0].loc[synthetic[0]["status"] != "missing", "run_id"]:
        (results / "runs" / run_id).mkdir(parents=True)
    out = build_report(results, root / "reports" / "index.html", png=True)
    assert out.exists()
    return out


@pytest.fixture(scope="module")
def page(report: Path) -> str:
    return report.read_text()


def test_report_is_self_contained(page: str) -> None:
    assert 'src="http' not in page and "https://cdn" not in page
    assert "<script src=" not in page  # every script is inline
    assert page.count("window.vegaEmbed=") == 1  # the vega bundle, once


def test_report_has_one_rendered_spec_per_figure(page: str) -> None:
    div_ids = re.findall(r'<div class="chart" id="([^"]+)">', page)
    # + the lr study's sweep over lr (numeric, two values) + one int8 scatter per protocol (static, dynamic,
    # torchao) + the static protocol's degradation against validation loss
    assert len(div_ids) == len(STUDIES) * (len(FIGURES) + len(METRIC_FIGURES)) + 1 + 3 + 1
    assert "fig-int8-degradation-torchao_dynamic" in div_ids
    specs = chart_specs(page)
    assert sorted(specs) == sorted(div_ids)
    for spec in specs.values():
        assert "vega-lite" in spec["$schema"]
        assert "data" in spec or "datasets" in spec
        # Rendering proves the spec is valid Vega-Lite, not just JSON (about 0.1 s a chart).
        assert "<svg" in vl_convert.vegalite_to_svg(spec)


def test_report_lists_runs_and_provenance(page: str) -> None:
    for run_id, *_, status, _error in RUNS:
        assert re.search(rf"<td>{re.escape(run_id)}</td>.*?<td class=\"status-{status}\">{status}</td>", page)
    assert REVISION in page
    assert "&lt;no result&gt;" in page  # the error's last line, escaped
    assert "Learning rate" in page and "Does OP avoid outliers?" in page


def test_study_sections_hold_only_their_runs(page: str) -> None:
    specs = chart_specs(page)
    blocks_runs = {row["run_id"] for row in spec_values(specs["fig-blocks-final-layer-kurtosis"])}
    assert blocks_runs == {RUNS[0][0], RUNS[1][0]}
    lr_labels = {row["label"] for row in spec_values(specs["fig-lr-final-layer-kurtosis"])}
    assert lr_labels == {"block=pre_ln, lr=0.01"}  # the missing run has no metrics


def test_kurtosis_chart_is_log_scaled_facets_and_escapes_dotted_fields(synthetic) -> None:
    _, metrics = synthetic
    spec = plots.kurtosis_over_steps(metrics.assign(label=metrics["block"])).to_dict()
    assert spec["spec"]["encoding"]["y"]["scale"]["type"] == "log"
    assert spec["facet"]["field"] == "label" and spec["columns"] == plots.FACET_COLUMNS
    assert any(t["field"] == "optim\\.eps" for t in spec["spec"]["encoding"]["tooltip"])
    assert {row["site"] for row in spec_values(spec)} == set(plots.LAYER_SITES)


def test_final_layer_kurtosis_drops_non_finite_values(synthetic) -> None:
    _, metrics = synthetic
    rows = spec_values(plots.final_layer_kurtosis(metrics).to_dict())
    assert all(np.isfinite(row["value"]) for row in rows)
    last_step = {row["run_id"]: row["step"] for row in rows}
    # The diverged run's step 20 is finite in its last layer only: the curve falls back to step 10, whole.
    assert last_step == {RUNS[0][0]: 20, RUNS[1][0]: 10, **{run_id: 20 for run_id, *_ in QUANT_ONLY_RUNS}}
    assert len([row for row in rows if row["run_id"] == RUNS[1][0]]) == N_LAYERS + 1


@pytest.mark.parametrize("slug, figure", FIGURES)
def test_empty_metrics_give_a_no_data_chart(slug, figure) -> None:
    spec = figure(pd.DataFrame(columns=["run_id", "label", *METRIC_SCHEMA.names])).to_dict()
    assert spec["mark"]["type"] == "text"
    assert spec_values(spec) == [{"text": "no data"}]


def test_report_renders_with_empty_metrics(synthetic, tmp_path) -> None:
    runs, metrics = synthetic
    _write_results(tmp_path, runs, metrics.iloc[:0])
    page = build_report(tmp_path, tmp_path / "index.html", png=False).read_text()
    specs = chart_specs(page)
    assert len(specs) == len(STUDIES) * len(FIGURES) + 1  # the sweep reads runs.parquet, not metrics
    assert all(spec["mark"]["type"] == "text" for stem, spec in specs.items() if "sweep" not in stem)
    assert 'id="int8"' not in page and "<h3>int8" not in page  # no quant.parquet: results from before it existed


def test_int8_section_table_has_the_papers_columns_and_values(page: str) -> None:
    assert page.index('<section id="study-lr">') < page.index('<section id="int8">') < page.index("<h2>Runs</h2>")
    header, rows = table_rows(page_section(page, "int8"))
    # block and optimizer always, beta because it varies; status because one run diverged; the final
    # validation loss (runs.parquet) beside the perplexities, to compare at matched loss.
    assert header == ["block", "optimizer", "beta", "status", "val loss", "mean Kurt", "ppl fp",
                      "static W8A8", "static W4A4", "dynamic W8A8", "torchao W8A8"]
    assert list(rows) == sorted(QUANT, key=lambda run_id: QUANT[run_id][0])  # sorted by mean kurtosis
    assert rows["tiny/pre_ln/beta1/adamw/lr0.01/seed0"] == [
        "pre_ln", "adamw", "1", "completed", "3.200", "25.6", "16.00", "63.40 (+296%)", "64.00 (+300%)",
        "16.30 (+1.9%)", "16.25 (+1.6%)"
    ]
    assert rows[QUANT_ONLY_RUNS[0][0]][6:] == ["14.71", "14.87 (+1.1%)", "22.00 (+49.6%)", "14.70 (-0.07%)",
                                               "14.72 (+0.07%)"]
    assert rows[RUNS[1][0]] == ["op", "adamw", "0.2", "diverged", "-", "300", "-", "-", "-", "-", "-"]
    section = page_section(page, "int8")
    assert "<b>static</b>" in section and "<b>dynamic</b>" in section
    # the real-kernel protocol, where measured: its tensors, and how far it sits from the simulation
    assert "<b>torchao</b> (torchao dynamic per-token, real int8 kernels)" in section
    assert ("torchao W8A8 and the simulated dynamic W8A8 differ by at most 0.31% of ppl fp over 4 runs "
            "(tiny/pre_ln/beta1/adamw/lr0.01/seed0, whose simulated change is +1.9%)") in section


def test_study_sections_have_their_own_int8_table(page: str) -> None:
    header, rows = table_rows(page_section(page, "study-blocks").split("<h3>int8 quantisation</h3>")[1])
    assert header[:2] == ["configuration", "status"]
    assert {run_id: cells[0] for run_id, cells in rows.items()} == {RUNS[0][0]: "block=pre_ln", RUNS[1][0]: "block=op"}
    header, rows = table_rows(page_section(page, "study-lr").split("<h3>int8 quantisation</h3>")[1])
    assert "status" not in header  # the missing run has no int8 rows; the other one completed
    assert rows == {RUNS[0][0]: ["block=pre_ln, lr=0.01", "3.200", "25.6", "16.00", "63.40 (+296%)",
                                 "64.00 (+300%)", "16.30 (+1.9%)", "16.25 (+1.6%)"]}


def test_int8_scatter_states_the_spearman_correlation(page: str) -> None:
    specs = chart_specs(page)
    static, dynamic = specs["fig-int8-degradation-static_per_tensor"], specs["fig-int8-degradation-dynamic_per_token"]
    completed = [run_id for run_id, (_, ppl_fp, _) in QUANT.items() if math.isfinite(ppl_fp)]
    for bits, expected in ((8, 1.0), (4, 0.8)):  # planted
        kurtosis = [QUANT[r][0] for r in completed]
        degradation = [QUANT[r][2][(STATIC, bits)] / QUANT[r][1] - 1 for r in completed]
        assert _spearman_by_formula(kurtosis, degradation) == pytest.approx(expected)
        subtitle = " ".join(static["title"]["subtitle"])
        printed = re.search(rf"W{bits}A{bits} ρ = (-?[0-9.]+) \(n = (\d+)\)", subtitle)
        assert printed and float(printed.group(1)) == pytest.approx(expected) and int(printed.group(2)) == 4
    # The diverged run (NaN perplexities) is left out; every point is finite.
    assert {row["run_id"] for row in spec_values(static)} == set(completed)
    assert all(math.isfinite(row["degradation"]) for row in spec_values(static))
    assert static["encoding"]["x"]["scale"]["type"] == "log"
    assert static["encoding"]["y"]["scale"]["type"] == "log"
    assert dynamic["encoding"]["y"]["scale"]["type"] == "symlog"  # one run improves: no log axis
    assert "symlog" in " ".join(dynamic["title"]["subtitle"])
    tooltip_fields = {t["field"] for t in static["encoding"]["tooltip"]}
    assert {"run_id", "block", "optim\\.eps", "ppl_fp", "ppl_q"} <= tooltip_fields
    for spec in (static, dynamic):
        assert "<svg" in vl_convert.vegalite_to_svg(spec)


def test_spearman_matches_the_rank_formula() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=20), rng.normal(size=20)
    assert plots_int8.spearman(x, y) == pytest.approx(_spearman_by_formula(list(x), list(y)))
    assert plots_int8.spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)  # ranks, not values
    assert plots_int8.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties averaged
    assert math.isnan(plots_int8.spearman([1, 2], [2, 1]))  # too few runs
    assert math.isnan(plots_int8.spearman([1, 2, 3], [5, 5, 5]))  # constant


def test_empty_quant_gives_a_no_data_scatter(quant) -> None:
    for frame in (pd.DataFrame(), quant.iloc[:0], quant[quant["ppl_fp"].isna()]):
        spec = plots_int8.quant_degradation_scatter(frame).to_dict()
        assert spec["mark"]["type"] == "text" and spec_values(spec) == [{"text": "no data"}]


def test_report_renders_with_an_empty_quant_table(synthetic, quant, tmp_path) -> None:
    runs, metrics = synthetic
    _write_results(tmp_path, runs, metrics, quant.iloc[:0])
    page = build_report(tmp_path, tmp_path / "index.html", png=False).read_text()
    assert 'id="int8"' not in page and "<h3>int8" not in page
    assert len(chart_specs(page)) == len(STUDIES) * (len(FIGURES) + len(METRIC_FIGURES)) + 1


def test_studies_listed_as_a_list_keep_their_order() -> None:
    meta = {"studies": [{"name": "z_last", "axes": []}, {"name": "a_first", "axes": []}]}
    assert [name for name, _ in studies(meta)] == ["z_last", "a_first"]


def _figure_ids(section_html: str) -> list[str]:
    return re.findall(r'<div class="chart" id="([^"]+)">', section_html)


def test_front_page_lists_the_grid_status_counts_and_wall_time(page: str) -> None:
    front = page[: page.index('<section id="study-')]
    assert "6 runs: 4 completed, 1 diverged, 1 missing." in front  # completed first, missing last
    assert "Wall time: 5.0 min summed over runs, longest run 1.0 min" in front
    grid = re.search(r'<table class="grid">(.*?)</table>', front, re.S).group(1)
    rows = re.findall(r"<tr><td>(.*?)</tr>", grid, re.S)
    assert [re.search(r"<code>(.*?)</code>", row).group(1) for row in rows] == ["blocks", "lr"]  # study order
    cells = [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", "<td>" + rows[1], re.S)]
    assert cells[2:] == ["block: pre_ln" + "lr: 0.003, 0.01", "2", "1 completed, 1 missing"]
    assert 'href="#study-lr"' in rows[1] and "Does a higher LR raise kurtosis?" in rows[1]
    # a partial grid says so first; provenance names git, libraries, machine and date
    assert "<b>Partial results:</b> 1 of 6 runs have no results (1 missing)" in front
    provenance = re.search(r'<table class="provenance">(.*?)</table>', front, re.S).group(1)
    assert f"{REVISION} (clean)" in provenance and "altair " in provenance and "testhost" in provenance
    assert "2025-01-01T00:00:00+00:00" in provenance


def test_each_study_opens_with_its_headline_figure(page: str) -> None:
    blocks, lr = page_section(page, "study-blocks"), page_section(page, "study-lr")
    # categorical study: per-layer kurtosis over training, one panel per block (the paper's figs. 2 and 4)
    assert _figure_ids(blocks)[0] == "fig-blocks-kurtosis-over-steps"
    assert blocks.index('<figure class="headline">') < blocks.index("fig-blocks-kurtosis-over-steps")
    assert blocks.count('class="headline"') == 1 and "Figure 1.1 (headline)." in blocks
    # numeric sweep: kurtosis against lr first, then the rest
    assert _figure_ids(lr) == [
        "fig-lr-sweep-lr", "fig-lr-kurtosis-over-steps", "fig-lr-final-layer-kurtosis",
        "fig-lr-final-layer-token-correlation", "fig-lr-final-layer-mmr", "fig-lr-final-layer-sink-rate",
        "fig-lr-final-layer-massive-ratio", "fig-lr-sink-rate-over-steps", "fig-lr-massive-ratio-over-steps",
        "fig-lr-loss-curves",
    ]
    assert "Figure 2.1 (headline)." in lr
    # kurtosis and signal propagation sit side by side in one row
    rows = re.findall(r'<div class="row">(.*?)</div>\n(?=<figure|<div class="row">|<h3|</section)', blocks, re.S)
    assert [_figure_ids(row) for row in rows] == [
        ["fig-blocks-final-layer-kurtosis", "fig-blocks-final-layer-token-correlation"],
        ["fig-blocks-final-layer-sink-rate", "fig-blocks-final-layer-massive-ratio"],  # sink rate beside massive ratio
        ["fig-blocks-sink-rate-over-steps", "fig-blocks-massive-ratio-over-steps"],
    ]


def test_sweep_chart_of_the_report(page: str) -> None:
    spec = chart_specs(page)["fig-lr-sweep-lr"]
    assert spec["facet"]["column"]["field"] == "measure"
    layer = spec["spec"]["layer"]
    assert layer[0]["encoding"]["x"]["field"] == "lr" and layer[0]["encoding"]["x"]["scale"]["type"] == "log"
    assert layer[0]["encoding"]["y"]["scale"]["type"] == "log"
    rows = spec_values(spec)
    # only the completed run has kurtosis; the missing one is left out (no NaN reaches the spec)
    assert {r["run_id"] for r in rows if r["kind"] == "run"} == {RUNS[0][0]}
    assert {(r["measure"], r["value"]) for r in rows if r["kind"] == "mean"} == {
        ("peak Kurt", 40.0), ("final mean Kurt", QUANT[RUNS[0][0]][0])
    }
    subtitle = " ".join(spec["title"]["subtitle"])
    assert "peak Kurt = maximum of Kurt over logged steps and layers" in subtitle
    assert "final mean Kurt = Kurt averaged over layers" in subtitle and "x log scale" in subtitle


def _sweep_runs() -> pd.DataFrame:
    """Two blocks x three eps x two seeds; one diverged run, one failed (no kurtosis)."""
    rows = []
    for block, eps, seed in itertools.product(["pre_ln", "op"], [1e-8, 1e-4, 1e-3], [0, 1]):
        peak = (100.0 if block == "pre_ln" else 4.0) * (1 + seed) / (1 + 1e4 * eps)
        status = "completed"
        if (block, eps, seed) == ("op", 1e-3, 1):
            status, peak = "failed", math.nan
        if (block, eps, seed) == ("pre_ln", 1e-3, 0):
            status = "diverged"
        rows.append({"run_id": f"{block}/eps{eps}/seed{seed}", "block": block, "optim.eps": eps, "seed": seed,
                     "studies": ["eps"], "status": status, "peak_kurtosis": peak,
                     "final_mean_kurtosis": peak / 2, "final_val_loss": 3.0, "error": None})
    runs = pd.DataFrame(rows)
    return runs.assign(label="block=" + runs["block"])


def test_sweep_lines_average_seeds_and_keep_each_run_as_a_point() -> None:
    runs = _sweep_runs()
    spec = plots.sweep_lines(runs, "optim.eps").to_dict()
    rows = spec_values(spec)
    points = [r for r in rows if r["kind"] == "run"]
    means = {(r["label"], r["optim.eps"], r["measure"]): (r["value"], r["n"]) for r in rows if r["kind"] == "mean"}
    assert len(points) == 2 * (len(runs) - 1)  # every run with kurtosis, in both panels
    assert means[("block=pre_ln", 1e-8, "peak Kurt")] == (pytest.approx((100.0 + 200.0) / 2 / (1 + 1e-4)), 2)
    assert means[("block=op", 1e-3, "final mean Kurt")] == (pytest.approx(4.0 / 11 / 2), 1)  # the failed seed is out
    assert {p["status"] for p in points} == {"completed", "diverged"}
    line, dots = spec["spec"]["layer"]
    assert line["encoding"]["x"]["field"] == "optim\\.eps" and line["encoding"]["x"]["scale"]["type"] == "log"
    assert line["encoding"]["color"]["field"] == "label"
    assert spec["params"][0]["bind"] == "legend" and spec["params"][0]["views"] == [line["name"]]
    assert dots["encoding"]["shape"]["field"] == "status"
    assert any(t["field"] == "seed" for t in dots["encoding"]["tooltip"])  # the run's config in its tooltip
    assert "<svg" in vl_convert.vegalite_to_svg(spec)
    # beta reads linearly; no plottable run gives "no data"
    beta = runs.rename(columns={"optim.eps": "beta"}).assign(beta=lambda df: df["beta"] * 1e3 + 0.1)
    assert plots.sweep_lines(beta, "beta").to_dict()["spec"]["layer"][0]["encoding"]["x"]["scale"].get("type") is None
    empty = plots.sweep_lines(runs.assign(peak_kurtosis=math.nan, final_mean_kurtosis=math.nan), "optim.eps")
    assert spec_values(empty.to_dict()) == [{"text": "no data"}]


def test_log_axis() -> None:
    assert plots.log_axis("lr", [3e-3, 1e-2]) and plots.log_axis("optim.eps", [1e-8, 1e-4])
    assert not plots.log_axis("beta", [0.1, 0.2, 0.5, 1.0])
    assert plots.log_axis("model.width", [1, 100])  # two orders of magnitude
    assert not plots.log_axis("lr", [0.0, 1e-2])  # a log axis cannot show 0


def test_runs_table_links_each_run_folder_relative_to_the_page(report: Path, page: str) -> None:
    runs_section = page_section(page, "runs")
    links = dict(re.findall(r"<tr><td>([^<]+)</td>.*?<td class=\"files\">(.*?)</td>", runs_section))
    href = re.search(r'href="([^"]+)"', links[RUNS[0][0]]).group(1)
    assert href == "../results/runs/tiny/pre_ln/beta1/adamw/lr0.01/seed0/"  # from reports/ to results/
    assert (report.parent / href).resolve() == (report.parent.parent / "results" / "runs" / RUNS[0][0]).resolve()
    assert links[RUNS[2][0]] == "-"  # the missing run has no folder


def test_figures_are_exported_beside_the_page_and_linked_from_their_captions(report: Path, page: str) -> None:
    figures = report.parent / "figures"
    stems = [div.removeprefix("fig-") for div in _figure_ids(page)]
    assert sorted(p.name for p in figures.iterdir()) == sorted(f"{s}.{ext}" for s in stems for ext in ("svg", "png"))
    svg = (figures / "lr-sweep-lr.svg").read_text()
    assert svg.startswith("<svg") and "Kurtosis against lr" in svg
    assert (figures / "lr-sweep-lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stem in stems:
        caption = re.search(rf'id="fig-{re.escape(stem)}">.*?<figcaption>(.*?)</figcaption>', page, re.S).group(1)
        assert f'href="figures/{stem}.svg"' in caption and f'href="figures/{stem}.png"' in caption


def test_svg_only_export_removes_stale_files(synthetic, tmp_path) -> None:
    runs, metrics = synthetic
    _write_results(tmp_path, runs, metrics)
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "removed-study-loss-curves.svg").write_text("<svg/>")
    (figures / "blocks-loss-curves.png").write_bytes(b"old")
    (figures / "notes.txt").write_text("kept")
    page = build_report(tmp_path, tmp_path / "index.html", png=False).read_text()
    names = {p.name for p in figures.iterdir()}
    assert "notes.txt" in names and not any(n.endswith(".png") for n in names)
    assert "removed-study-loss-curves.svg" not in names and "blocks-loss-curves.svg" in names
    assert ".png" not in re.sub(r"<script.*?</script>", "", page, flags=re.S)


def test_a_study_whose_runs_are_all_missing_renders(synthetic, tmp_path) -> None:
    """While the grid runs (or after failures) a study can have no result at all: no error, "no data"."""
    runs, metrics = synthetic
    ghost = {"run_id": "tiny/post_ln/beta1/adamw/lr0.01/seed0", "block": "post_ln", "scale": "tiny",
             "optimizer": "adamw", "beta": 1.0, "lr": 0.01, "seed": 0, "optim.eps": 1e-8, "studies": ["ghost"],
             "status": "failed", "error": "Traceback\nRuntimeError: CUDA out of memory", "steps_done": 0}
    runs = pd.concat([runs, pd.DataFrame([ghost])], ignore_index=True)
    results = tmp_path / "results"
    _write_results(results, runs, metrics)
    studies_meta = dict(STUDIES, ghost={"title": "Ghost", "question": "?", "axes": ["block", "lr"]})
    write_parquet(runs, results / "runs.parquet", metadata={"studies": studies_meta, "grid_columns": GRID})
    page = build_report(results, tmp_path / "reports" / "index.html", png=False).read_text()
    ghost_section = page_section(page, "study-ghost")
    assert "No run of this study has finished yet" in ghost_section and "1 failed" in ghost_section
    specs = chart_specs(ghost_section)
    assert len(specs) == len(FIGURES)  # lr has one value here: no sweep
    assert all(spec_values(spec) == [{"text": "no data"}] for spec in specs.values())
    assert "RuntimeError: CUDA out of memory" in page_section(page, "runs")
    # every spec still renders
    for spec in specs.values():
        assert "<svg" in vl_convert.vegalite_to_svg(spec)


def test_a_corrupt_run_is_shown_like_a_failed_one_with_its_reason(synthetic, tmp_path) -> None:
    """`ofe aggregate` marks a run whose files cannot be trusted `corrupt`: red, its reason in the runs
    table, counted among the runs without results, ordered after failed and before missing."""
    runs, metrics = synthetic
    reason = "corrupt: metrics.parquet: Parquet magic bytes not found in footer"
    bad = {"run_id": "tiny/post_ln/beta1/adamw/lr0.01/seed0", "block": "post_ln", "scale": "tiny",
           "optimizer": "adamw", "beta": 1.0, "lr": 0.01, "seed": 0, "optim.eps": 1e-8, "studies": ["blocks"],
           "status": "corrupt", "error": reason, "steps_done": None}
    runs = pd.concat([runs, pd.DataFrame([bad])], ignore_index=True)
    _write_results(tmp_path / "results", runs, metrics)
    page = build_report(tmp_path / "results", tmp_path / "reports" / "index.html", png=False).read_text()
    assert re.search(r"\.status-corrupt[^{}]*\{ color: #c62828; \}", page)
    row = next(r for r in re.findall(r"<tr>.*?</tr>", page_section(page, "runs")) if bad["run_id"] in r)
    assert '<td class="status-corrupt">corrupt</td>' in row and f'<td class="error">{reason}</td>' in row
    front = page[: page.index('<section id="study-')]
    assert "7 runs: 4 completed, 1 diverged, 1 corrupt, 1 missing." in front
    assert "<b>Partial results:</b> 2 of 7 runs have no results (1 corrupt, 1 missing)" in front
    assert "Failed and corrupt runs list their error" in front


def test_partial_tables_link_the_run_folders_beside_them(synthetic, tmp_path) -> None:
    """The workflow's onerror report reads results/partial/*.parquet; the run folders are results/runs/."""
    runs, metrics = synthetic
    _write_results(tmp_path / "results" / "partial", runs, metrics)
    (tmp_path / "results" / "runs" / RUNS[0][0]).mkdir(parents=True)
    page = build_report(tmp_path / "results" / "partial", tmp_path / "reports" / "index.html", png=False).read_text()
    assert f'href="../results/runs/{RUNS[0][0]}/"' in page


def test_report_command_writes_page_figures_and_manifest(synthetic, tmp_path) -> None:
    runs, metrics = synthetic
    _write_results(tmp_path / "results", runs, metrics)
    out, manifest = tmp_path / "reports" / "index.html", tmp_path / "results" / "report.json"
    code = main(["report", "--results", str(tmp_path / "results"), "--out", str(out), "--no-png",
                 "--manifest", str(manifest)])
    assert code == 0 and out.exists()
    written = json.loads(manifest.read_text())
    assert written["runs"] == len(runs) and written["status"]["completed"] == 4
    assert written["figures"] == sorted(p.name for p in (out.parent / "figures").iterdir())
    assert written["figures"] and all(name.endswith(".svg") for name in written["figures"])


def test_report_refuses_tables_of_another_set_of_runs(synthetic, quant, tmp_path) -> None:
    """The workflow passes the plan's run-id digest: tables aggregated for another grid are never reported."""
    from ofe.plan.grid import runs_digest

    runs, metrics = synthetic
    _write_results(tmp_path, runs, metrics, quant)
    out = tmp_path / "page" / "index.html"
    args = ["report", "--results", str(tmp_path), "--out", str(out), "--no-png", "--expect-runs-digest"]
    assert main([*args, runs_digest(list(runs.run_id)[:-1])]) == 2  # the plan has one run fewer
    assert not out.exists()
    assert main([*args, runs_digest(runs.run_id)]) == 0 and out.exists()
