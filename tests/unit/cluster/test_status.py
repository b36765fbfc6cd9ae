"""`python -m ofe status`: every run's state read from its folder, with no Snakemake head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ofe.config import QuantConfig
from ofe.train.quantise import quantise_run
from ofe.train.trainer import train
from tests.helpers import REPO
from tests.helpers.runs import tiny_run


def _start_ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


@pytest.fixture
def grid(data_dir, tmp_path):
    """A results folder whose plan has one run in each state, and the expected row of each."""
    results = tmp_path / "results"
    cfgs = {
        "done": tiny_run(data_dir, train={"steps": 8}),
        "diverged": tiny_run(data_dir, optim={"lr": 1e6, "warmup_frac": 0.0, "clip": None},
                             model={"norm": "none", "final_norm": "none"}, train={"steps": 50}),
        "failed": tiny_run(data_dir, train={"steps": 9}),
        "missing": tiny_run(data_dir, train={"steps": 10}),
        "running": tiny_run(data_dir, train={"steps": 300}),
        "pending": tiny_run(data_dir, train={"steps": 11}),
        "corrupt": tiny_run(data_dir, train={"steps": 13}),
    }
    plan = {"runs": [{"run_id": f"tiny/{name}/seed0", "grid": {}, "studies": ["s"], "config": c.to_dict()}
                     for name, c in cfgs.items()]}
    results.mkdir()
    (results / "plan.json").write_text(json.dumps(plan))
    run = {name: results / "runs" / "tiny" / name / "seed0" for name in cfgs}
    done = train(cfgs["done"], run["done"])
    train(cfgs["diverged"], run["diverged"])
    quant = QuantConfig(protocols=("dynamic_per_token",), bits=(8,), calib_batches=1, eval_batches=1)
    for name in ("done", "diverged"):  # the job's last step: quant.parquet marks the run complete
        quantise_run(run[name], quant)
    assert pd.read_parquet(run["diverged"] / "quant.parquet").ppl_fp.isna().all()  # written, with NaN rows
    run["failed"].mkdir(parents=True)
    (run["failed"] / "error.txt").write_text("Traceback...\nRuntimeError: CUDA out of memory\n")
    # a live local job: this test's own process stands in for it, its log says where it is
    log = tmp_path / "running.out"
    log.write_text("[ofe] step 25/300 loss 3.100 lr 1.00e-02 max-kurtosis 4.21 900 tok/s\n"
                   "[ofe] step 50/300 loss 2.900 lr 1.00e-02 max-kurtosis 5.37 910 tok/s\n")
    run["running"].mkdir(parents=True)
    (run["running"] / "job.json").write_text(json.dumps({
        "job_id": "4242", "cluster": "local", "pid": os.getpid(), "pid_start": _start_ticks(os.getpid()),
        "stdout": str(log), "folder": str(tmp_path)}))
    run["pending"].mkdir(parents=True)
    (run["pending"] / "job.json").write_text(json.dumps({
        "job_id": "77", "cluster": "slurm", "stdout": str(tmp_path / "none.out"), "folder": str(tmp_path)}))
    run["corrupt"].mkdir(parents=True)
    (run["corrupt"] / "summary.json").write_text("")
    metrics = pd.read_parquet(run["done"] / "metrics.parquet")
    kurt = metrics[metrics.metric == "kurtosis"]
    expected_kurt = kurt[kurt.step == kurt.step.max()].value.max()
    assert done["status"] == "completed"
    return results, expected_kurt


def _fake_squeue(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "squeue").write_text(f"#!/bin/sh\necho squeue >> {tmp_path}/calls.txt\necho '77|PENDING'\n")
    (bin_dir / "squeue").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_status_table_lists_every_run_with_its_state(grid, tmp_path):
    results, expected_kurt = grid
    out = subprocess.run([sys.executable, "-m", "ofe", "status", "--results", str(results)], cwd=REPO,
                         capture_output=True, text=True, env=_fake_squeue(tmp_path), timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0].split("/")[1]: line.split() for line in out.stdout.splitlines()
            if line.startswith("tiny/")}
    assert {name: r[1] for name, r in rows.items()} == {
        "done": "done", "diverged": "diverged", "failed": "failed", "missing": "missing",
        "running": "running", "pending": "pending", "corrupt": "corrupt"}
    assert rows["done"][2] == "8/8" and float(rows["done"][3]) == pytest.approx(expected_kurt, abs=0.006)
    assert rows["running"][2:5] == ["50/300", "5.37", "4242"]  # the job's latest progress line
    assert rows["pending"][4] == "77"
    assert "CUDA out of memory" in " ".join(rows["failed"])
    assert int(rows["diverged"][2].split("/")[0]) < 50
    assert rows["missing"][2] == "-/10"
    assert "7 runs: 1 done, 1 running, 1 pending, 1 failed, 1 diverged, 1 corrupt, 1 missing" in out.stdout
    # one batched query for the one SLURM job; none with --no-query
    assert (tmp_path / "calls.txt").read_text().split() == ["squeue"]
    again = subprocess.run([sys.executable, "-m", "ofe", "status", "--results", str(results), "--no-query"],
                           cwd=REPO, capture_output=True, text=True, env=_fake_squeue(tmp_path), timeout=60)
    assert again.returncode == 0 and (tmp_path / "calls.txt").read_text().split() == ["squeue"]


def test_status_without_a_plan_says_what_to_do(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ofe", "status", "--results", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "snakemake -n" in out.stderr


def _finished(run_dir: Path, cfg, status: str = "completed", metrics: bool = True, quant: bool = True) -> None:
    """A run folder as training leaves it (summary.json of `cfg`), with or without its other files."""
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps(
        {"status": status, "steps_done": cfg.train.steps, "max_kurtosis_last": 3.5, "config": cfg.to_dict()}))
    for name, present in (("metrics.parquet", metrics), ("quant.parquet", quant)):
        if present:
            (run_dir / name).write_bytes(b"PAR1")  # only the file's presence is read


def test_a_run_is_complete_only_once_quant_parquet_is_written(tmp_path, monkeypatch):
    from ofe.cluster.status import grid_status

    cfg = tiny_run(tmp_path / "data", train={"steps": 8})
    names = ("complete", "diverged", "quant_failed", "quant_pending", "quant_running", "quant_lost",
             "quant_no_job", "no_metrics")
    results = tmp_path / "results"
    results.mkdir()
    (results / "plan.json").write_text(json.dumps({"runs": [
        {"run_id": f"tiny/{n}/seed0", "grid": {}, "studies": ["s"], "config": cfg.to_dict()} for n in names]}))
    run = {n: results / "runs" / "tiny" / n / "seed0" for n in names}
    _finished(run["complete"], cfg)
    _finished(run["diverged"], cfg, status="diverged")
    for n in names[2:7]:
        _finished(run[n], cfg, quant=False)
    _finished(run["no_metrics"], cfg, metrics=False)
    (run["quant_failed"] / "error.txt").write_text("Traceback...\nRuntimeError: int8 evaluation ran out of memory\n")
    me, ticks = os.getpid(), _start_ticks(os.getpid())  # this process stands in for a live local job
    for n, record in (("quant_pending", {"job_id": "78", "cluster": "slurm"}),  # a quant-only rerun, queued
                      ("quant_running", {"job_id": "79", "cluster": "local", "pid": me, "pid_start": ticks}),
                      ("quant_lost", {"job_id": "80", "cluster": "local", "pid": me, "pid_start": ticks + 1})):
        (run[n] / "job.json").write_text(json.dumps({**record, "stdout": str(tmp_path / "none.out"),
                                                     "folder": str(tmp_path)}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\necho '78|PENDING'\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    rows = {r["run_id"].split("/")[1]: r for r in grid_status(results)}
    assert {n: r["status"] for n, r in rows.items()} == {
        "complete": "done", "diverged": "diverged", "quant_failed": "failed", "quant_pending": "pending",
        "quant_running": "running", "quant_lost": "corrupt", "quant_no_job": "corrupt", "no_metrics": "corrupt"}
    assert rows["quant_failed"]["detail"] == "RuntimeError: int8 evaluation ran out of memory"
    for n in ("quant_lost", "quant_no_job"):
        assert rows[n]["detail"] == "quant.parquet missing (quantisation did not finish); rerun the workflow"
    assert "metrics.parquet" in rows["no_metrics"]["detail"]
    assert rows["complete"]["step"] == 8 and rows["complete"]["max_kurtosis"] == 3.5


def test_a_fresh_shared_cache_answers_without_a_scheduler_call(tmp_path, monkeypatch):
    """A waiting head (waiting on job 81) keeps the shared cache; status reads the states from it, 81's
    and that of job 82, which only the cache's queue listing holds, with no squeue or sacct call."""
    from ofe.cluster.jobstate import StatusCache

    cfg = tiny_run(tmp_path / "data", train={"steps": 8})
    results = tmp_path / "results"
    results.mkdir()
    (results / "plan.json").write_text(json.dumps({"runs": [
        {"run_id": f"tiny/{n}/seed0", "grid": {}, "studies": ["s"], "config": cfg.to_dict()}
        for n in ("waited", "queued")]}))
    for name, job in (("waited", "81"), ("queued", "82")):
        run = results / "runs" / "tiny" / name / "seed0"
        run.mkdir(parents=True)
        (run / "job.json").write_text(json.dumps({"job_id": job, "cluster": "slurm", "folder": str(run),
                                                  "stdout": str(tmp_path / "none.out")}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("squeue", "echo '81|RUNNING'; echo '82|PENDING'"), ("sacct", "exit 0")):
        (bin_dir / name).write_text(f"#!/bin/sh\necho {name} >> {tmp_path}/calls.txt\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cache = StatusCache(results / ".ofe-status", max_age_s=15)  # the waiting head's query, in this process
    cache.register("81")  # as the dispatcher does for its jobs
    assert cache.state("81") == "RUNNING"
    cache.unregister("81")
    assert (tmp_path / "calls.txt").read_text().split() == ["squeue"]
    (tmp_path / "calls.txt").unlink()
    out = subprocess.run([sys.executable, "-m", "ofe", "status", "--results", str(results)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0].split("/")[1]: line.split() for line in out.stdout.splitlines()
            if line.startswith("tiny/")}
    assert rows["waited"][1] == "running" and "RUNNING" in rows["waited"]
    assert rows["queued"][1] == "pending" and "PENDING" in rows["queued"]
    assert not (tmp_path / "calls.txt").exists()  # zero scheduler calls
    # 81 then leaves the queue while nobody waits on it: a later listing (for 82) lacks it, so the
    # RUNNING kept for it is stale; status asks accounting instead of calling it running
    (bin_dir / "squeue").write_text(f"#!/bin/sh\necho squeue >> {tmp_path}/calls.txt\necho '82|PENDING'\n")
    (bin_dir / "sacct").write_text(f"#!/bin/sh\necho sacct >> {tmp_path}/calls.txt\necho '81|FAILED'\n")
    later = StatusCache(results / ".ofe-status", max_age_s=0)
    later.register("82")
    assert later.state("82") == "PENDING"
    later.unregister("82")
    out = subprocess.run([sys.executable, "-m", "ofe", "status", "--results", str(results)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    rows = {line.split()[0].split("/")[1]: line for line in out.stdout.splitlines() if line.startswith("tiny/")}
    assert rows["waited"].split()[1] == "failed" and "slurm FAILED" in rows["waited"], rows
    assert "sacct" in (tmp_path / "calls.txt").read_text().split()
