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

from ofe import plots
from ofe.report import FIGURES, build_report, studies
from ofe.results import METRIC_SCHEMA, write_parquet

REVISION = "0123456789abcdef0123456789abcdef01234567"
N_LAYERS = 2
LAYER_SITE_METRICS = ("kurtosis", "rms_sq_variance_centred", "max_median_ratio", "token_correlation", "rms")

# (run_id, block, lr, studies, status, error): one completed, one diverged, one missing (never produced metrics).
RUNS = [
    ("tiny/pre_ln/beta1/adamw/lr0.01/seed0", "pre_ln", 0.01, ["blocks", "lr"], "completed", None),
    ("tiny/op/beta0.2/adamw/lr0.01/seed0", "op", 0.01, ["blocks"], "diverged", "loss is nan at step 20"),
    ("tiny/pre_ln/beta1/adamw/lr0.003/seed0", "pre_ln", 0.003, ["lr"], "missing", "Traceback\n<no result>"),
]
STUDIES = {
    "blocks": {"title": "Norm blocks", "question": "Does OP avoid outliers?", "axes": ["block"]},
    "lr": {"title": "Learning rate", "question": "Does a higher LR raise kurtosis?", "axes": ["block", "lr"]},
}
GRID = ["block", "scale", "optimizer", "beta", "lr", "seed", "optim.eps"]


def _runs_frame() -> pd.DataFrame:
    rows = []
    for run_id, block, lr, studies, status, error in RUNS:
        done = status != "missing"
        rows.append(
            {
                "run_id": run_id,
                "block": block,
                "scale": "tiny",
                "optimizer": "adamw",
                "beta": 0.2 if block == "op" else 1.0,
                "lr": lr,
                "seed": 0,
                "optim.eps": 1e-8,
                "studies": studies,
                "status": status,
                "final_train_loss": 3.1 if done else math.nan,
                "final_val_loss": 3.2 if status == "completed" else math.nan,
                "tokens_per_s": 1.5e4 if done else math.nan,
                "wall_s": 60.0 if done else math.nan,
                "peak_kurtosis": 40.0 if done else math.nan,
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


def _write_results(results: Path, runs: pd.DataFrame, metrics: pd.DataFrame) -> None:
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


def _spec_blocks(page: str) -> dict[str, dict]:
    """target div id -> parsed Vega-Lite spec of every chart-spec block of the page."""
    pattern = r'<script type="application/json" class="chart-spec" data-target="([^"]+)">(.*?)</script>'
    blocks = re.findall(pattern, page, re.S)
    return {target: json.loads(payload) for target, payload in blocks}


def _values(spec: dict) -> list[dict]:
    """All inline data rows of a spec (Altair consolidates them under top-level `datasets`)."""
    return [row for rows in spec.get("datasets", {}).values() for row in rows]


@pytest.fixture(scope="module")
def synthetic() -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = _runs_frame()
    return runs, _metrics_frame(runs)


@pytest.fixture(scope="module")
def page(synthetic, tmp_path_factory) -> str:
    results = tmp_path_factory.mktemp("results")
    _write_results(results, *synthetic)
    out = build_report(results, results / "report" / "index.html")
    assert out.exists()
    return out.read_text()


def test_report_is_self_contained(page: str) -> None:
    assert 'src="http' not in page and "https://cdn" not in page
    assert "<script src=" not in page  # every script is inline
    assert page.count("window.vegaEmbed=") == 1  # the vega bundle, once


def test_report_has_one_rendered_spec_per_figure(page: str) -> None:
    div_ids = re.findall(r'<div class="chart" id="([^"]+)">', page)
    assert len(div_ids) == len(STUDIES) * len(FIGURES)
    specs = _spec_blocks(page)
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
    specs = _spec_blocks(page)
    blocks_runs = {row["run_id"] for row in _values(specs["fig-0-final-layer-kurtosis"])}
    assert blocks_runs == {RUNS[0][0], RUNS[1][0]}
    lr_labels = {row["label"] for row in _values(specs["fig-1-final-layer-kurtosis"])}
    assert lr_labels == {"block=pre_ln, lr=0.01"}  # the missing run has no metrics


def test_kurtosis_chart_is_log_scaled_facets_and_escapes_dotted_fields(synthetic) -> None:
    _, metrics = synthetic
    spec = plots.kurtosis_over_steps(metrics.assign(label=metrics["block"])).to_dict()
    assert spec["spec"]["encoding"]["y"]["scale"]["type"] == "log"
    assert spec["facet"]["field"] == "label" and spec["columns"] == plots.FACET_COLUMNS
    assert any(t["field"] == "optim\\.eps" for t in spec["spec"]["encoding"]["tooltip"])
    assert {row["site"] for row in _values(spec)} == set(plots.LAYER_SITES)


def test_final_layer_kurtosis_drops_non_finite_values(synthetic) -> None:
    _, metrics = synthetic
    rows = _values(plots.final_layer_kurtosis(metrics).to_dict())
    assert all(np.isfinite(row["value"]) for row in rows)
    last_step = {row["run_id"]: row["step"] for row in rows}
    # The diverged run's step 20 is finite in its last layer only: the curve falls back to step 10, whole.
    assert last_step == {RUNS[0][0]: 20, RUNS[1][0]: 10}
    assert len([row for row in rows if row["run_id"] == RUNS[1][0]]) == N_LAYERS + 1


@pytest.mark.parametrize("slug, figure", FIGURES)
def test_empty_metrics_give_a_no_data_chart(slug, figure) -> None:
    spec = figure(pd.DataFrame(columns=["run_id", "label", *METRIC_SCHEMA.names])).to_dict()
    assert spec["mark"]["type"] == "text"
    assert _values(spec) == [{"text": "no data"}]


def test_report_renders_with_empty_metrics(synthetic, tmp_path) -> None:
    runs, metrics = synthetic
    _write_results(tmp_path, runs, metrics.iloc[:0])
    page = build_report(tmp_path, tmp_path / "index.html").read_text()
    specs = _spec_blocks(page)
    assert len(specs) == len(STUDIES) * len(FIGURES)
    assert all(spec["mark"]["type"] == "text" for spec in specs.values())


def test_studies_listed_as_a_list_keep_their_order() -> None:
    meta = {"studies": [{"name": "z_last", "axes": []}, {"name": "a_first", "axes": []}]}
    assert [name for name, _ in studies(meta)] == ["z_last", "a_first"]
