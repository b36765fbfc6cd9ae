"""`ofe export`: a finished sweep, trained untracked, mirrored afterwards from its files; read back through
the trackers' own readers it equals the Parquet; a second export sends nothing; unfinished runs are skipped."""

from __future__ import annotations

import json

import pytest

from ofe.__main__ import main
from tests.helpers.tracking import (flat_config, mlflow_points, mlflow_run, offline_env, parquet_metrics,
                                    parquet_quant, same, wandb_history, wandb_records, wandb_summary)
from tests.unit.track.test_tracking import _run_dir, _train


@pytest.fixture(scope="module")
def sweep(data_dir, tmp_path_factory):
    """Two finished runs (seeds 0 and 1, quantised) and one folder that never finished, untracked."""
    results = tmp_path_factory.mktemp("sweep") / "results"
    for seed in (0, 1):
        _train(data_dir, _run_dir(results, seed), None, seed=seed)
    _run_dir(results, 2).mkdir(parents=True)
    (_run_dir(results, 2) / "config.json").write_text("{}")
    return results


@pytest.fixture
def results(sweep, tmp_path, monkeypatch):
    """A copy of the sweep per test (an export writes tracking.json into its run folders)."""
    import shutil

    offline_env(monkeypatch, tmp_path / "trackers")
    shutil.copytree(sweep, tmp_path / "results")
    return tmp_path / "results"


def _check(points: dict, run, last_step: int, quant: dict) -> None:
    want = parquet_metrics(run)
    assert {k for k in points if k[0] in {n for n, _ in want}} == set(want)
    assert all(len(points[k]) == 1 and same(points[k][0], v) for k, v in want.items())
    for key, value in quant.items():
        assert points[(key, last_step)] == [value]


def test_export_to_mlflow_reads_back_equal_and_is_idempotent(results, tmp_path, capsys):
    uri = (tmp_path / "store").as_uri()
    assert main(["export", "--to", "mlflow", "--results", str(results), "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "export 3/3" in out and "not finished (missing); skipped" in out
    assert out.count("exported as mlflow run") == 2
    client, runs = mlflow_run(uri, "ofe-results")  # the default project of a folder called results
    assert sorted(r.data.tags["mlflow.runName"] for r in runs) == [
        "tiny/pre_ln/beta1/adamw/lr0.003/seed0", "tiny/pre_ln/beta1/adamw/lr0.003/seed1"]
    for r in runs:
        run = results / "runs" / r.data.tags["mlflow.runName"]
        assert r.data.params == {k: str(v) for k, v in flat_config(run).items()}
        assert r.data.tags["group"] == "tiny/pre_ln/beta1/adamw/lr0.003" and r.info.status == "FINISHED"
        assert json.loads((run / "tracking.json").read_text())["runs"][0]["run_id"] == r.info.run_id
        _check(mlflow_points(client, r.info.run_id), run, 12, parquet_quant(run))

    assert main(["export", "--to", "mlflow", "--results", str(results), "--tracking-uri", uri]) == 0
    again = capsys.readouterr().out
    assert again.count("(tracking.json); skipped") == 2 and "exported as" not in again
    _, runs_after = mlflow_run(uri, "ofe-results")
    assert len(runs_after) == 2
    for r in runs_after:  # nothing sent twice
        run = results / "runs" / r.data.tags["mlflow.runName"]
        _check(mlflow_points(client, r.info.run_id), run, 12, parquet_quant(run))


def test_a_half_done_export_is_completed_under_the_same_id(results, tmp_path, capsys):
    """A tracker run cut short (steps 0..5 sent, no summary, as a live tracker that stopped leaves it): the
    export resumes that run, by the id in tracking.json, and sends only what it lacks."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "store").as_uri()
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("ofe-results")).info.run_id
    run = _run_dir(results, 0)
    client.log_batch(run_id, metrics=[Metric(k, v, 0, s) for s, m in _points_by_step(run) if s <= 5
                                      for k, v in m.items()])
    (run / "tracking.json").write_text(json.dumps({"config_hash": json.loads((run / "summary.json").read_text())
                                                   ["config_hash"], "runs": [
        {"backend": "mlflow", "project": "ofe-results", "tracking_uri": uri, "run_id": run_id, "logged_step": 5}]}))
    assert main(["export", "--to", "mlflow", "--results", str(results), "--tracking-uri", uri]) == 0
    assert f"completed as mlflow run {run_id}" in capsys.readouterr().out
    _check(mlflow_points(client, run_id), run, 12, parquet_quant(run))


def _points_by_step(run):
    by_step: dict[int, dict[str, float]] = {}
    for (name, step), value in parquet_metrics(run).items():
        by_step.setdefault(step, {})[name] = value
    return sorted(by_step.items())


@pytest.mark.slow  # wandb's service and inspector processes
def test_export_to_wandb_reads_back_equal(results, tmp_path, capsys):
    assert main(["export", "--to", "wandb", "--results", str(results), "--project", "sweep"]) == 0
    assert capsys.readouterr().out.count("exported as wandb run") == 2
    for seed in (0, 1):
        run = _run_dir(results, seed)
        run_id = json.loads((run / "tracking.json").read_text())["runs"][0]["run_id"]
        files = wandb_records(tmp_path / "trackers", run_id)
        _check(wandb_history(files), run, 12, {})
        summary = wandb_summary(files)
        assert all(same(summary[k], v) for k, v in parquet_quant(run).items())
    assert main(["export", "--to", "wandb", "--results", str(results), "--project", "sweep"]) == 0
    assert capsys.readouterr().out.count("(tracking.json); skipped") == 2


def test_export_refuses_a_key_of_the_other_backend(results, capsys):
    assert main(["export", "--to", "mlflow", "--results", str(results), "--mode", "online"]) == 2
    assert "tracking.mode: only for backend 'wandb'" in capsys.readouterr().err
