"""Runs mirrored to MLflow and W&B (issue 24), with the real packages, offline: what a tracked run leaves in
each tracker, read back through the tracker's own reader (MlflowClient; `wandb leet inspect`), equals
its run folder's Parquet rows; a resumed run continues its tracker run; a failing tracker is a warning."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from ofe.__main__ import main
from tests.helpers import REPO
from tests.helpers.runs import Killed, kill_after, tiny_run
from tests.helpers.tracking import (flat_config, mlflow_points, mlflow_run, offline_env, parquet_metrics,
                                    parquet_quant, same, wandb_history, wandb_records, wandb_run_record,
                                    wandb_summary)

GRID = {"scale": "tiny", "block": "pre_ln", "beta": 1.0, "optimizer": "adamw", "lr": 0.003, "seed": 0}
QUANT = {"bits": [8], "calib_batches": 1, "eval_batches": 2}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    offline_env(monkeypatch, tmp_path / "trackers")


def _run_dir(results: Path, seed: int = 0) -> Path:
    return results / "runs" / "tiny" / "pre_ln" / "beta1" / "adamw" / "lr0.003" / f"seed{seed}"


def _train(data_dir: Path, run: Path, tracking: dict | None, seed: int = 0, **sections) -> None:
    """`ofe train` of a tiny run with grid labels, then `ofe quantise`: the job's two steps by hand."""
    cfg = replace(tiny_run(data_dir, **sections), grid={**GRID, "seed": seed})
    cfg = replace(cfg, train=replace(cfg.train, seed=seed))
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(cfg.to_json())
    extra = ["--tracking-json", json.dumps(tracking)] if tracking else []
    assert main(["train", "--config", str(run / "config.json"), "--out", str(run), *extra]) == 0
    assert main(["quantise", "--run", str(run), "--quant-json", json.dumps(QUANT)]) == 0


def _record(run: Path) -> dict:
    return json.loads((run / "tracking.json").read_text())


def _check_points(points: dict, run: Path) -> None:
    """Every Parquet row is in the tracker exactly once, with its value, and the tracker holds no other step."""
    want = parquet_metrics(run)
    steps = {(k, s) for k, s in points if k in {name for name, _ in want}}
    assert steps == set(want)
    for key, value in want.items():
        assert len(points[key]) == 1, f"{key}: logged {len(points[key])} times"
        assert same(points[key][0], value), key


def test_an_mlflow_run_holds_the_run_folders_rows(data_dir, tmp_path):
    results = tmp_path / "results"
    run = _run_dir(results)
    _train(data_dir, run, {"backend": "mlflow", "tracking_uri": (tmp_path / "store").as_uri(), "project": "abl"})
    client, runs = mlflow_run((tmp_path / "store").as_uri(), "abl")
    assert [r.info.run_id for r in runs] == [_record(run)["runs"][0]["run_id"]]
    info = runs[0]
    assert info.info.status == "FINISHED"
    assert info.data.params == {k: str(v) for k, v in flat_config(run).items()}
    assert {k: info.data.tags[k] for k in GRID} == {"scale": "tiny", "block": "pre_ln", "beta": "1",
                                                   "optimizer": "adamw", "lr": "0.003", "seed": "0"}
    assert info.data.tags["group"] == "tiny/pre_ln/beta1/adamw/lr0.003"  # the seeds of one config
    assert info.data.tags["mlflow.runName"] == "tiny/pre_ln/beta1/adamw/lr0.003/seed0"
    points = mlflow_points(client, info.info.run_id)
    _check_points(points, run)
    summary = json.loads((run / "summary.json").read_text())
    for key, value in parquet_quant(run).items():  # the int8 rows, at the last step
        assert points[(key, summary["steps_done"])] == [value]
    assert points[("summary/final_val_loss", summary["steps_done"])] == [summary["final_val_loss"]]
    assert info.data.tags["status"] == "completed"
    assert _record(run)["runs"][0] | {"summary": True, "quant": True} == _record(run)["runs"][0]


@pytest.mark.slow  # starts wandb's service process and the inspector's
def test_a_wandb_offline_run_holds_the_run_folders_rows(data_dir, tmp_path):
    results = tmp_path / "results"
    run = _run_dir(results)
    _train(data_dir, run, {"backend": "wandb", "project": "abl"})
    run_id = _record(run)["runs"][0]["run_id"]
    files = wandb_records(tmp_path / "trackers", run_id)  # WANDB_DIR wins over RESULTS
    assert len(files) == 2  # training, then the int8 rows in the same run
    meta = wandb_run_record(files)
    assert (meta["run_id"], meta["project"], meta["run_group"], meta["display_name"]) == (
        run_id, "abl", "tiny/pre_ln/beta1/adamw/lr0.003", "tiny/pre_ln/beta1/adamw/lr0.003/seed0")
    assert set(meta["tags"]) == {"scale=tiny", "block=pre_ln", "beta=1", "optimizer=adamw", "lr=0.003", "seed=0"}
    config = {k: v for k, v in meta["config"]["update"].items() if k != "_wandb"}
    assert config == json.loads(json.dumps(flat_config(run)))  # tuples are lists in JSON
    _check_points(wandb_history(files), run)
    summary, saved = wandb_summary(files), json.loads((run / "summary.json").read_text())
    for key, value in parquet_quant(run).items():
        assert same(summary[key], value), key
    assert summary["summary/final_train_loss"] == saved["final_train_loss"]
    assert summary["status"] == "completed"
    assert any(r.get("type") == "exit" and r["exit"].get("exit_code", 0) == 0 for r in files[0])


@pytest.mark.parametrize("backend", ["mlflow", pytest.param("wandb", marks=pytest.mark.slow)])
def test_a_resumed_run_continues_its_tracker_run(data_dir, tmp_path, backend):
    """Killed after its step-4 checkpoint, the run restarts from it: the same tracker run, and every step
    in it once (MLflow holds the history; W&B offline files are read together, as `wandb sync` uploads them)."""
    from ofe.plan.tracking import check_settings
    from ofe.train.trainer import train

    results = tmp_path / "results"
    run = _run_dir(results)
    settings = check_settings({"backend": backend, "project": "abl"}, results)
    run.mkdir(parents=True)
    (run / "tracking-settings.json").write_text(json.dumps(settings))
    cfg = replace(tiny_run(data_dir), grid=GRID)
    with pytest.raises(Killed):
        train(cfg, run, on_checkpoint=[kill_after(4)])
    first = _record(run)["runs"][0]["run_id"]
    train(cfg, run)
    assert [e["run_id"] for e in _record(run)["runs"]] == [first]
    if backend == "mlflow":
        client, runs = mlflow_run(settings["tracking_uri"], "abl")
        assert [r.info.run_id for r in runs] == [first]
        points = mlflow_points(client, first)
    else:
        points = wandb_history(wandb_records(tmp_path / "trackers", first))
    _check_points(points, run)


class Refuses:
    """A backend that fails where it is told to: on open, or on its second log call."""

    def __init__(self, where: str) -> None:
        self.where, self.calls = where, 0

    def open(self, settings, run_id, meta):
        if self.where == "open":
            raise ConnectionError("tracker unreachable")
        return "x1"

    def last_step(self):
        return -1

    def log(self, step, metrics):
        self.calls += 1
        if self.where == "log" and self.calls == 2:
            raise RuntimeError("tracker refused a point")

    def summary(self, step, values, tags):
        pass

    def close(self, ok):
        pass


@pytest.mark.parametrize("where", ["open", "log"])
def test_a_failing_tracker_is_a_warning_and_the_run_completes(data_dir, tmp_path, monkeypatch, capsys, where):
    from ofe.track import backends
    from ofe.train.trainer import train

    monkeypatch.setitem(backends.BACKENDS, "refuses", lambda: Refuses(where))
    run = _run_dir(tmp_path / "results")
    run.mkdir(parents=True)
    (run / "tracking-settings.json").write_text(json.dumps({"backend": "refuses", "project": "p"}))
    summary = train(tiny_run(data_dir), run)
    assert summary["status"] == "completed" and summary["steps_done"] == 12
    out = capsys.readouterr().out
    assert "[ofe] tracking: warning:" in out and "the run goes on without tracking" in out
    assert ("tracker unreachable" if where == "open" else "tracker refused a point") in out
    untracked = tmp_path / "untracked"
    train(tiny_run(data_dir), untracked)  # the same rows as a run never tracked
    pd.testing.assert_frame_equal(pd.read_parquet(run / "metrics.parquet"),
                                  pd.read_parquet(untracked / "metrics.parquet"))


def test_an_unimportable_tracker_is_a_warning(data_dir, tmp_path, monkeypatch, capsys):
    from ofe.train.trainer import train

    for name in ["mlflow", *(m for m in sys.modules if m.startswith("mlflow."))]:
        monkeypatch.setitem(sys.modules, name, None)  # import mlflow (and from mlflow.x) raises ImportError
    run = _run_dir(tmp_path / "results")
    run.mkdir(parents=True)
    (run / "tracking-settings.json").write_text(json.dumps({"backend": "mlflow", "project": "p",
                                                            "tracking_uri": (tmp_path / "s").as_uri()}))
    assert train(tiny_run(data_dir), run)["status"] == "completed"
    out = capsys.readouterr().out
    assert "could not start a mlflow run" in out and "ModuleNotFoundError" in out


def test_tracking_off_imports_no_tracker(data_dir, tmp_path):
    """A run without tracking settings, in a fresh interpreter: neither package is ever imported."""
    code = f"""
import json, sys
from pathlib import Path
from tests.helpers.runs import tiny_run
from ofe.train.trainer import train
from ofe.cluster.jobs import quantise_in_process
out = Path({str(tmp_path / 'run')!r})
train(tiny_run(Path({str(data_dir)!r}), train={{"steps": 4}}), out)
quantise_in_process(out, {QUANT!r})
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ("wandb", "mlflow"))))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []
    assert not (tmp_path / "run" / "tracking.json").exists()


def test_launch_takes_the_settings_out_of_the_launcher_and_writes_them_for_the_job(data_dir, tmp_path, monkeypatch):
    """The workflow passes tracking inside --launcher-json (common.smk says why); `ofe launch` hands the
    launcher on without it and writes it beside config.json before submitting; without it, removes it."""
    from ofe.cluster import launch as launch_module

    seen = {}

    def submit(work, out, launcher, status_dir, exec_wait=False):  # in place of submitit: no job
        seen["launcher"] = launcher
        work.before_submit({})
        return {"status": "completed", "steps_done": 0}

    monkeypatch.setattr(launch_module, "launch_work", submit)
    settings = {"backend": "mlflow", "project": "p", "tracking_uri": "file:///x"}
    run = tmp_path / "run"
    args = ["launch", "--run-json", tiny_run(data_dir).to_json(), "--out", str(run)]
    assert main([*args, "--launcher-json", json.dumps({"cluster": "local", "tracking": settings})]) == 0
    assert seen["launcher"] == {"cluster": "local"}
    assert json.loads((run / "tracking-settings.json").read_text()) == settings
    assert main([*args, "--launcher-json", json.dumps({"cluster": "local"})]) == 0
    assert not (run / "tracking-settings.json").exists()
