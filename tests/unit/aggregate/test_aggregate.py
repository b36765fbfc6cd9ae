"""Aggregation: per-run files -> tidy tables, for finished, diverged, failed and missing runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ofe.aggregate.runs import aggregate
from ofe.config import config_hash
from ofe.io import METRIC_SCHEMA, read_metadata, write_parquet
from ofe.io import QUANT_SCHEMA


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


# ---- corrupt run folders: each is isolated, the others aggregate -------------------------------------

GRID_COLUMNS = ["scale", "block", "beta", "optimizer", "lr", "seed"]


def _config(seed: int) -> dict:
    """A run config in dict form (what plans and summaries carry); config_hash leaves grid/data_dir out."""
    return {"model": {"n_layer": 2, "qk_norm": "none"}, "optim": {"lr": 0.01, "betas": [0.9, 0.999]},
            "train": {"seed": seed}, "data_dir": "results/data/abc", "grid": {"seed": seed}}


def _rows(seed: int) -> list[tuple]:
    return [(0, 0, 0, "block_input", "kurtosis", 1.0 + seed), (10, 80, 0, "block_input", "kurtosis", 3.0 + seed),
            (10, 80, -1, "val", "loss", 2.0 + seed)]


def _write_run(runs: Path, run_id: str, seed: int, config: dict) -> Path:
    """A finished run folder as training and quantisation write it (summary, metrics, quant)."""
    d = runs / run_id
    d.mkdir(parents=True)
    meta = {"config": config, "status": "completed"}
    write_parquet(_metrics(_rows(seed)), d / "metrics.parquet", METRIC_SCHEMA, meta)
    write_parquet(pd.DataFrame([("static_per_tensor", 8, 10.0 + seed, 12.0, 2.0)], columns=QUANT_SCHEMA.names),
                  d / "quant.parquet", QUANT_SCHEMA, meta)
    (d / "summary.json").write_text(json.dumps({"status": "completed", "final_val_loss": 2.0 + seed,
                                                "steps_done": 10, "config": config}))
    return d


@pytest.fixture
def three_runs(tmp_path):
    """Runs a, b, c, all finished; the tests damage b."""
    plan = {"runs": [], "grid_columns": GRID_COLUMNS, "studies": [{"name": "s"}], "config": {}}
    for seed, run_id in enumerate("abc"):
        run = _run(run_id, "pre_ln", ["s"])
        run["grid"]["seed"] = seed
        run["config"] = _config(seed)
        # the plan's copy points elsewhere for data and labels: neither is part of the run's identity
        run["config"]["data_dir"], run["config"]["grid"] = "/elsewhere", {}
        _write_run(tmp_path / "runs", run_id, seed, _config(seed))
        plan["runs"].append(run)
    return tmp_path, plan


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _wrong_schema(path: Path) -> None:
    write_parquet(pd.DataFrame({"step": [0], "kurt": [1.0]}), path)


DAMAGE = {  # how run b's folder is damaged -> the start of its reason
    "empty summary": (lambda d: (d / "summary.json").write_text(""), "corrupt: summary.json: Expecting value"),
    "invalid summary": (lambda d: (d / "summary.json").write_text('{"status": "comp'), "corrupt: summary.json: "),
    "summary not a dict": (lambda d: (d / "summary.json").write_text("[1, 2]"),
                           "corrupt: summary.json: not a JSON object"),
    "summary without status": (lambda d: (d / "summary.json").write_text('{"steps_done": 10}'),
                               "corrupt: summary.json: no status"),
    "summary field of the wrong type": (
        lambda d: (d / "summary.json").write_text('{"status": "completed", "steps_done": "ten"}'),
        "corrupt: summary.json: steps_done: 'ten' is not an integer"),
    "truncated metrics": (lambda d: _truncate(d / "metrics.parquet"), "corrupt: metrics.parquet: Parquet magic bytes"),
    "empty metrics": (lambda d: (d / "metrics.parquet").write_bytes(b""), "corrupt: metrics.parquet: "),
    "garbage metrics": (lambda d: (d / "metrics.parquet").write_bytes(b"\x00garbage" * 100),
                        "corrupt: metrics.parquet: "),
    "metrics of the wrong schema": (lambda d: _wrong_schema(d / "metrics.parquet"),
                                    "corrupt: metrics.parquet: wrong schema: no column tokens"),
    "no metrics for a finished run": (lambda d: (d / "metrics.parquet").unlink(), "corrupt: metrics.parquet: missing"),
    "truncated quant": (lambda d: _truncate(d / "quant.parquet"), "corrupt: quant.parquet: Parquet magic bytes"),
    "quant of the wrong schema": (lambda d: _wrong_schema(d / "quant.parquet"),
                                  "corrupt: quant.parquet: wrong schema: no column protocol"),
    # outputs without the summary.json written after them, which marks them final
    "no summary beside the tables": (lambda d: (d / "summary.json").unlink(),
                                     "corrupt: summary.json: missing, though metrics.parquet and "
                                     "quant.parquet exist"),
    "no summary beside an int8 table": (lambda d: [(d / n).unlink() for n in ("summary.json", "metrics.parquet")],
                                        "corrupt: summary.json: missing, though quant.parquet exists"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_corrupt_run_is_isolated_and_names_its_file(three_runs, damage):
    path, plan = three_runs
    harm, reason = DAMAGE[damage]
    harm(path / "runs" / "b")
    frames = aggregate(plan, path)
    runs = pd.read_parquet(path / "runs.parquet").set_index("run_id")
    assert runs.status.to_dict() == {"a": "completed", "b": "corrupt", "c": "completed"}
    assert runs.loc["b", "error"].startswith(reason), runs.loc["b", "error"]
    assert "\n" not in runs.loc["b", "error"]  # the runs table shows one line
    # b shows no number at all; a and c have every row exactly as written
    assert runs.loc["b", ["final_val_loss", "peak_kurtosis", "steps_done"]].isna().all()
    assert runs.loc[["a", "c"], "final_val_loss"].tolist() == [2.0, 4.0]
    assert runs.loc[["a", "c"], "peak_kurtosis"].tolist() == [3.0, 5.0]
    metrics = pd.read_parquet(path / "metrics.parquet")
    pd.testing.assert_frame_equal(metrics, frames["metrics"])
    for seed, run_id in ((0, "a"), (2, "c")):
        got = metrics[metrics.run_id == run_id][METRIC_SCHEMA.names].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, _metrics(_rows(seed)))
        assert set(metrics[metrics.run_id == run_id].seed) == {seed}
    assert set(metrics.run_id) == {"a", "c"}
    quant = pd.read_parquet(path / "quant.parquet")
    assert quant.set_index("run_id").ppl_fp.to_dict() == {"a": 10.0, "c": 12.0}


def test_results_of_another_config_are_corrupt(three_runs):
    path, plan = three_runs
    stale = _config(1) | {"model": {"n_layer": 4, "qk_norm": "none"}}
    summary = json.loads((path / "runs" / "b" / "summary.json").read_text())
    (path / "runs" / "b" / "summary.json").write_text(json.dumps(summary | {"config": stale}))
    aggregate(plan, path)
    runs = pd.read_parquet(path / "runs.parquet").set_index("run_id")
    have, want = config_hash(stale), config_hash(plan["runs"][1]["config"])
    assert runs.status.to_dict() == {"a": "completed", "b": "corrupt", "c": "completed"}
    assert runs.loc["b", "error"] == (f"corrupt: summary.json: results belong to another config "
                                      f"(hash {have}, planned {want}); rerun it")
    assert set(pd.read_parquet(path / "metrics.parquet").run_id) == {"a", "c"}


def test_an_int8_table_of_another_config_is_corrupt(three_runs):
    """The summary matches, but quant.parquet was written for an earlier config of the run."""
    path, plan = three_runs
    stale = _config(7)
    write_parquet(pd.DataFrame([("static_per_tensor", 8, 99.0, 99.0, 0.0)], columns=QUANT_SCHEMA.names),
                  path / "runs" / "b" / "quant.parquet", QUANT_SCHEMA, {"config": stale})
    frames = aggregate(plan, path)
    runs = frames["runs"].set_index("run_id")
    assert runs.loc["b", "status"] == "corrupt"
    assert runs.loc["b", "error"].startswith("corrupt: quant.parquet: results belong to another config "
                                             f"(hash {config_hash(stale)}, planned ")
    assert 99.0 not in frames["quant"].ppl_fp.tolist()


def test_older_summaries_with_nan_and_integral_floats_read(three_runs):
    """Summaries written before they were strict JSON carry NaN/Infinity; steps may be 10.0."""
    path, plan = three_runs
    (path / "runs" / "b" / "summary.json").write_text(
        '{"status": "diverged", "final_val_loss": NaN, "tokens_per_s": Infinity, "steps_done": 10.0}')
    runs = aggregate(plan, path)["runs"].set_index("run_id")
    assert runs.loc["b", "status"] == "diverged" and runs.loc["b", "steps_done"] == 10
    assert math.isnan(runs.loc["b", "final_val_loss"]) and runs.loc["b", "tokens_per_s"] == math.inf


def test_a_run_in_progress_or_never_finished_is_missing_not_corrupt(three_runs):
    """What a launched, running or killed run leaves before its last writes is no damage."""
    path, plan = three_runs
    b = path / "runs" / "b"
    for name in ("summary.json", "metrics.parquet", "quant.parquet"):
        (b / name).unlink()
    for name in ("job.json", "config.json"):
        (b / name).write_text("{}")
    for name in ("checkpoint.pt", "checkpoint.prev.pt", ".checkpoint.pt.1234.tmp", "stdout.log"):
        (b / name).write_bytes(b"partial")
    (b / "stale" / "20250101T000000Z").mkdir(parents=True)  # another config's outputs, moved aside
    (b / "stale" / "20250101T000000Z" / "metrics.parquet").write_bytes(b"old")
    runs = aggregate(plan, path)["runs"].set_index("run_id")
    assert runs.loc["b", "status"] == "missing" and pd.isna(runs.loc["b", "error"])


def test_a_failed_run_with_a_stale_quant_table_shows_no_numbers(three_runs):
    """Only a finished run's files are read: a failed run's leftovers are not its results."""
    path, plan = three_runs
    (path / "runs" / "b" / "summary.json").unlink()
    (path / "runs" / "b" / "error.txt").write_text("RuntimeError: boom\n")
    frames = aggregate(plan, path)
    assert frames["runs"].set_index("run_id").loc["b", "error"] == "RuntimeError: boom"
    assert set(frames["quant"].run_id) == set(frames["metrics"].run_id) == {"a", "c"}


# ---- grid columns typed from the plan's values -------------------------------------------------------

def _plan_with_axis(tmp_path: Path, axis: str, values: list) -> dict:
    plan = {"runs": [], "grid_columns": [*GRID_COLUMNS, axis], "studies": [{"name": "s"}], "config": {}}
    for i, value in enumerate(values):
        run = _run(f"r{i}", "pre_ln", ["s"])
        run["grid"][axis] = value
        _write_run(tmp_path / "runs", run["run_id"], i, _config(i))
        plan["runs"].append(run)
    return plan


@pytest.mark.parametrize("axis, values, arrow_type, expected", [
    ("model.qk_norm", ["none", "rms"], pa.string(), ["none", "rms"]),
    # lists are text labels, written as in run folder names: hashable for grouping, readable in legends
    ("optim.betas", [[0.9, 0.95], [0.9, 0.999], None], pa.string(), ["0.9,0.95", "0.9,0.999", None]),
    ("model.beta_trainable", [True, False], pa.bool_(), [True, False]),
    ("model.n_layer", [2, 4], pa.int64(), [2, 4]),
    ("model.logit_cap", [None, 30.0, 50], pa.float64(), [None, 30.0, 50.0]),
    ("train.device", ["cpu", 1, 2.5, True], pa.string(), ["cpu", "1", "2.5", "true"]),
])
def test_extra_grid_columns_take_their_values_type(tmp_path, axis, values, arrow_type, expected):
    plan = _plan_with_axis(tmp_path, axis, values)
    aggregate(plan, tmp_path)
    for name in ("runs", "metrics", "quant"):
        schema = pq.read_schema(tmp_path / f"{name}.parquet")
        assert schema.field(axis).type == arrow_type, name
        assert (schema.field("seed").type, schema.field("lr").type) == (pa.int64(), pa.float64())
        column = pq.read_table(tmp_path / f"{name}.parquet").group_by("run_id").aggregate([(axis, "min")])
        got = dict(zip(column["run_id"].to_pylist(), column[f"{axis}_min"].to_pylist()))
        assert got == {f"r{i}": v for i, v in enumerate(expected)}, name
