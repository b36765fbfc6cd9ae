"""Aggregation: per-run files -> tidy tables, for finished, diverged, failed and missing runs."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from ofe.aggregate import aggregate
from ofe.quant import QUANT_SCHEMA
from ofe.results import METRIC_SCHEMA, read_metadata, write_parquet


def _run(run_id: str, block: str, studies: list[str]) -> dict:
    grid = {"scale": "tiny", "block": block, "beta": 1.0, "optimizer": "adamw", "lr": 0.01, "seed": 0}
    return {"run_id": run_id, "grid": grid, "studies": studies}


def _metrics(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=METRIC_SCHEMA.names)


@pytest.fixture
def results(tmp_path):
    runs = tmp_path / "runs"
    done = runs / "a"
    done.mkdir(parents=True)
    # kurtosis: step 0 layers (1, 1); step 10 layers (2, 6): peak 6, final mean 4; the pre-norm site is ignored
    write_parquet(_metrics([
        (0, 0, 0, "block_input", "kurtosis", 1.0), (0, 0, 1, "unembed_input", "kurtosis", 1.0),
        (10, 80, 0, "block_input", "kurtosis", 2.0), (10, 80, 1, "unembed_input", "kurtosis", 6.0),
        (10, 80, 1, "unembed_input_pre_norm", "kurtosis", 50.0),
        (10, 80, -1, "val", "loss", 2.5),
    ]), done / "metrics.parquet", METRIC_SCHEMA)
    (done / "summary.json").write_text(json.dumps({"status": "completed", "final_val_loss": 2.5,
                                                   "steps_done": 10, "wall_s": 3.0, "tokens_per_s": 100.0}))
    write_parquet(pd.DataFrame([("static_per_tensor", 8, 10.0, 12.0, 2.0)], columns=QUANT_SCHEMA.names),
                  done / "quant.parquet", QUANT_SCHEMA)
    failed = runs / "b"
    failed.mkdir()
    (failed / "error.txt").write_text("Traceback ...\n  File x\nRuntimeError: CUDA out of memory\n\n")
    plan = {"runs": [_run("a", "pre_ln", ["s1"]), _run("b", "op", ["s1", "s2"]), _run("c", "op", ["s2"])],
            "grid_columns": ["scale", "block", "beta", "optimizer", "lr", "seed"],
            "studies": [{"name": "s1"}, {"name": "s2"}], "config": {"k": 1}}
    return tmp_path, plan


def test_runs_table_has_status_error_and_kurtosis(results):
    path, plan = results
    frames = aggregate(plan, path)
    runs = pd.read_parquet(path / "runs.parquet").set_index("run_id")
    pd.testing.assert_frame_equal(runs.reset_index(), frames["runs"])
    assert runs.status.to_dict() == {"a": "completed", "b": "failed", "c": "missing"}
    assert runs.loc["a", "peak_kurtosis"] == 6.0 and runs.loc["a", "final_mean_kurtosis"] == 4.0
    assert runs.loc["b", "error"] == "RuntimeError: CUDA out of memory"
    assert math.isnan(runs.loc["c", "peak_kurtosis"])
    assert list(runs.loc["b", "studies"]) == ["s1", "s2"]
    assert runs.loc["a", "final_val_loss"] == 2.5
    meta = read_metadata(path / "runs.parquet")
    assert meta["config"] == {"k": 1} and "provenance" in meta


def test_metrics_and_quant_tables_carry_grid_columns(results):
    path, plan = results
    aggregate(plan, path)
    metrics = pd.read_parquet(path / "metrics.parquet")
    assert len(metrics) == 6 and set(metrics.run_id) == {"a"} and set(metrics.block) == {"pre_ln"}
    assert list(metrics.columns[:7]) == ["run_id", "scale", "block", "beta", "optimizer", "lr", "seed"]
    quant = pd.read_parquet(path / "quant.parquet")
    row = quant.iloc[0]
    assert (row.run_id, row.ppl_q, row.mean_kurtosis, row.peak_kurtosis) == ("a", 12.0, 4.0, 6.0)


def test_empty_results_still_aggregate(tmp_path):
    plan = {"runs": [_run("x", "op", ["s"])], "grid_columns": ["block"], "studies": [], "config": {}}
    frames = aggregate(plan, tmp_path)
    assert frames["metrics"].empty and frames["quant"].empty
    assert pd.read_parquet(tmp_path / "metrics.parquet").columns.tolist()[:2] == ["run_id", "block"]
