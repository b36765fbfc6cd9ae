"""Issue 24's two features through the whole workflow (Snakemake, local executor): a grid whose runs are
mirrored live to MLflow and quantised by torchao's real int8 kernels beside the simulation; switching the
tracker afterwards reruns nothing, and `ofe export` sends the finished runs to W&B. Every value is read back
through the trackers' own readers and compared with the Parquet the runs wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.helpers.tracking import (mlflow_points, mlflow_run, parquet_metrics, parquet_quant, same,
                                    wandb_history, wandb_records, wandb_summary)
from tests.helpers.workflow import SNAKEMAKE, TEST_CONFIG, job_counts
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # starts Snakemake and trains a grid

RUNS = ["tiny/op/beta0.2/adamw/lr0.01/seed0", "tiny/pre_ln/beta1/adamw/lr0.01/seed0"]
LAST_STEP = TEST_CONFIG["defaults"]["train"]["steps"]


def _env(root: Path) -> dict[str, str]:
    """The jobs' environment: W&B offline and quiet, every file under `root`, no key (no network)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        (root / name.lower()).mkdir(parents=True, exist_ok=True)
        env[name] = str(root / name.lower())
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    return env


def _snakemake(workdir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--profile", str(REPO / "profiles" / "local"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, timeout=900, env=env)


def _config(workdir: Path, tracking: dict) -> None:
    quant = {**TEST_CONFIG["quant"], "protocols": ["static_per_tensor", "dynamic_per_token", "torchao_dynamic"]}
    (workdir / "config.yaml").write_text(yaml.safe_dump({**TEST_CONFIG, "quant": quant, "tracking": tracking}))


def test_a_grid_tracked_live_to_mlflow_with_real_int8_then_exported_to_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this process reads the store MLflow 3 keeps in maintenance
    workdir, env = tmp_path / "work", _env(tmp_path / "trackers")
    workdir.mkdir()
    _config(workdir, {"backend": "mlflow", "project": "grid"})
    out = _snakemake(workdir, env)
    assert out.returncode == 0, out.stderr[-3000:]
    results = workdir / "results"

    # torchao's rows stand beside the simulated ones, at 8 bits only, in every run and in the report
    quant = pd.read_parquet(results / "quant.parquet")
    assert set(quant.protocol) == {"static_per_tensor", "dynamic_per_token", "torchao_dynamic"}
    assert set(quant[quant.protocol == "torchao_dynamic"].bits) == {8}
    assert len(quant) == 2 * (2 * 2 + 1)  # runs x (simulated protocols x bits + torchao at 8)
    assert (quant.ppl_q > 1).all()
    assert "torchao W8A8" in (workdir / "reports" / "index.html").read_text()

    # MLflow's default store is RESULTS/mlruns; every run's every value equals its Parquet, logged once
    client, runs = mlflow_run((results / "mlruns").resolve().as_uri(), "grid")
    assert sorted(r.data.tags["mlflow.runName"] for r in runs) == RUNS
    for r in runs:
        run = results / "runs" / r.data.tags["mlflow.runName"]
        points, want = mlflow_points(client, r.info.run_id), parquet_metrics(run)
        assert all(len(points[k]) == 1 and same(points[k][0], v) for k, v in want.items())
        for key, value in parquet_quant(run).items():
            assert points[(key, LAST_STEP)] == [value]
        assert r.info.status == "FINISHED"

    # the tracker is not part of any run: another backend retrains and requantises nothing (the plan,
    # which records the whole config, and the tables and report after it are rebuilt: seconds)
    _config(workdir, {"backend": "wandb"})
    again = _snakemake(workdir, env, "-n")
    assert again.returncode == 0, again.stderr[-3000:]
    assert set(job_counts(again.stdout)) <= {"plan", "aggregate", "report", "all", "total"}  # no train job

    # ... and the finished grid goes to W&B after the fact, from its files
    export = subprocess.run([sys.executable, "-m", "ofe", "export", "--to", "wandb", "--results", str(results),
                             "--project", "grid"], capture_output=True, text=True, cwd=workdir, env=env,
                            timeout=600)
    assert export.returncode == 0, export.stderr[-3000:]
    for name in RUNS:
        run = results / "runs" / name
        record = json.loads((run / "tracking.json").read_text())
        wandb_id = next(t["run_id"] for t in record["runs"] if t["backend"] == "wandb")
        files = wandb_records(Path(env["WANDB_DIR"]), wandb_id)
        history, summary = wandb_history(files), wandb_summary(files)
        want = parquet_metrics(run)
        assert all(len(history[k]) == 1 and same(history[k][0], v) for k, v in want.items())
        for key, value in parquet_quant(run).items():
            assert summary[key] == value
