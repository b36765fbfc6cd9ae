"""The slurm profile against a real single-node SLURM (scripts/slurm-localhost.sh start; CI starts it):
completed jobs in sacct, preemption requeue, rerun of a failed run only, re-attach after a killed head."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from ofe.train.trainer import train
from tests.helpers import REPO
from tests.helpers.runs import tiny_run
from tests.helpers.services import require_service
from tests.helpers.slurm import (HOW, SNAKEMAKE, launcher, planned_hash, queued_jobs, run_snakemake, settled_jobs, slurm_up,
                                 snakemake_cmd, workflow_dir)

pytestmark = pytest.mark.slow  # starts processes: Snakemake against a real SLURM


@pytest.fixture(scope="module", autouse=True)
def slurm() -> None:
    require_service(slurm_up(), "a SLURM controller with accounting (sacct)", HOW)


def test_two_run_grid_completes_on_slurm_with_the_literal_profile_command(tmp_path):
    """`python -m ofe install-profile`, then `snakemake --profile slurm` from the project root, as the
    README says; HOME is a fresh folder, and the installed profile is pointed at this test's folder and
    launcher file as a user would edit their own."""
    prefix = f"ofe{uuid.uuid4().hex[:6]}-"
    (tmp_path / "work").mkdir()
    wd = workflow_dir(tmp_path / "work", prefix)
    env = {**{k: v for k, v in os.environ.items() if k != "XDG_CONFIG_HOME"}, "HOME": str(tmp_path / "home")}
    install = subprocess.run([sys.executable, "-m", "ofe", "install-profile"], cwd=REPO, env=env,
                             capture_output=True, text=True, check=True)
    assert "snakemake --profile slurm" in install.stdout
    profile = tmp_path / "home" / ".config" / "snakemake" / "slurm" / "config.yaml"
    text = re.sub(r"launcher_file=\S+", f"launcher_file={wd / 'launcher.yaml'}", profile.read_text())
    profile.write_text(text + f"directory: {wd}\nlatency-wait: 5\n")
    out = subprocess.run([SNAKEMAKE, "--profile", "slurm"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "training jobs go to slurm" in out.stderr
    jobs = settled_jobs(prefix, expected=2)
    assert len(jobs) == 2 and set(jobs.state) == {"COMPLETED"}, jobs
    runs = pd.read_parquet(wd / "results" / "runs.parquet")
    assert set(runs.status) == {"completed"}
    for run_id in runs.run_id:
        info = json.loads((wd / "results" / "runs" / run_id / "job.json").read_text())
        assert info["cluster"] == "slurm" and info["job_id"] in set(jobs.job_id)
        # quantisation ran inside the SLURM job, on the compute node, not in the head's rule
        assert "W8A8: ppl" in Path(info["stdout"]).read_text()
    assert len(pd.read_parquet(wd / "results" / "quant.parquet")) == 2 * 2  # 2 runs x 2 protocols x W8
    assert (wd / "reports" / "index.html").exists()
    status = subprocess.run([sys.executable, "-m", "ofe", "status", "--results", str(wd / "results")],
                            cwd=REPO, capture_output=True, text=True, check=True)
    assert "2 runs: 2 done" in status.stdout


def test_requeued_job_resumes_to_identical_metrics(data_dir, tmp_path):
    prefix = f"ofe{uuid.uuid4().hex[:6]}-"
    # ~25 s of training: SLURM kills the job KillWait (5 s) after `scontrol requeue`, mid-training
    cfg = tiny_run(data_dir, train={"steps": 3000, "checkpoint_every": 50, "log_every": 100, "eval_every": 500})
    train(cfg, tmp_path / "straight")
    out = tmp_path / "requeued"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ofe", "launch", "--run-json", cfg.to_json(), "--launcher-json",
         json.dumps(launcher(prefix)), "--out", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    job_id = json.loads((out / "job.json").read_text())["job_id"]
    assert not (out / "summary.json").exists(), "the job finished before it could be requeued"
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    assert "resumed" in (Path(json.loads((out / "job.json").read_text())["stdout"]).read_text())
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "straight" / "metrics.parquet"),
                                  pd.read_parquet(out / "metrics.parquet"))
    assert settled_jobs(prefix).state.tolist() == ["COMPLETED"]


def test_only_the_failed_run_reruns(tmp_path):
    prefix = f"ofe{uuid.uuid4().hex[:6]}-"
    wd = workflow_dir(tmp_path, prefix)
    broken = wd / "results" / "runs" / "tiny" / "op" / "beta0.2" / "adamw" / "lr0.01" / "seed0"
    broken.mkdir(parents=True)
    # a checkpoint of this very config whose weights do not fit the model: the job fails on resume
    # (an unreadable or foreign checkpoint would be moved aside and the run would start fresh)
    torch.save({"model": {"nonsense": torch.zeros(1)}, "optimizer": {}, "step": 5, "rows": [], "seconds": 0.0,
                "status": "running", "skipped_steps": 0, "consecutive_skips": 0,
                "config_hash": planned_hash(wd, "tiny/op/beta0.2/adamw/lr0.01/seed0")}, broken / "checkpoint.pt")
    first = run_snakemake(wd)
    assert first.returncode != 0
    runs = pd.read_parquet(wd / "results" / "partial" / "runs.parquet").set_index("block")  # the partial report's
    assert runs.loc["pre_ln", "status"] == "completed"
    assert runs.loc["op", "status"] == "failed" and runs.loc["op", "error"]
    assert "failed" in (wd / "reports" / "index.html").read_text()
    (broken / "checkpoint.pt").unlink()
    second = run_snakemake(wd)
    assert second.returncode == 0, second.stderr[-3000:]
    jobs = settled_jobs(prefix, expected=4)
    # pre_ln ran once; op ran (and failed) twice in the first invocation (retries: 1), then once more
    per_run = jobs.name.str.contains("_op_").value_counts().to_dict()
    assert per_run.get(False) == 1, jobs
    assert per_run.get(True) == 3, jobs
    assert set(pd.read_parquet(wd / "results" / "runs.parquet").status) == {"completed"}


def test_killed_head_reattaches_instead_of_resubmitting(tmp_path):
    prefix = f"ofe{uuid.uuid4().hex[:6]}-"
    wd = workflow_dir(tmp_path, prefix, steps=3000)  # ~30 s of training per run
    head = subprocess.Popen(snakemake_cmd(wd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    runs_dir = wd / "results" / "runs"
    deadline = time.time() + 180
    while len(list(runs_dir.rglob("checkpoint.pt"))) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert len(list(runs_dir.rglob("job.json"))) == 2
    # a lost login session: the head and its waiting rules die at once (SIGTERM would let Snakemake
    # wait for its running rules, i.e. for the jobs)
    os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=60)
    assert queued_jobs(prefix) == ["RUNNING", "RUNNING"]  # the jobs live on
    assert not list(runs_dir.rglob("summary.json"))
    unlock = run_snakemake(wd, "--unlock")  # a hard-killed head leaves its lock behind
    assert unlock.returncode == 0, unlock.stderr[-2000:]
    out = run_snakemake(wd)
    assert out.returncode == 0, out.stderr[-3000:]
    logs = "".join(p.read_text() for p in (wd / "results" / "logs" / "train").rglob("*.log"))
    assert "re-attaching to SLURM job" in logs
    jobs = settled_jobs(prefix, expected=2)
    assert len(jobs) == 2 and set(jobs.state) == {"COMPLETED"}, jobs


def test_cancel_command_cancels_live_jobs(tmp_path, data_dir):
    prefix = f"ofe{uuid.uuid4().hex[:6]}-"
    cfg = tiny_run(data_dir, train={"steps": 5000})
    out = tmp_path / "results" / "runs" / "x"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ofe", "launch", "--run-json", cfg.to_json(), "--launcher-json",
         json.dumps(launcher(prefix)), "--out", str(out)], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / "job.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    dry = subprocess.run([sys.executable, "-m", "ofe", "cancel", "--results", str(tmp_path / "results"),
                          "--dry-run"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "would cancel slurm job" in dry.stdout
    subprocess.run([sys.executable, "-m", "ofe", "cancel", "--results", str(tmp_path / "results")],
                   cwd=REPO, check=True)
    proc.wait(timeout=120)
    assert proc.returncode != 0  # the waiting launcher reports the cancelled job as failed
    assert settled_jobs(prefix).state.str.startswith("CANCELLED").all()


def test_a_checkpoint_study_inspects_on_slurm(tmp_path):
    """A checkpoint study's inspection is a SLURM job of its own (the launcher's settings, the
    `inspect:` section's resources), recorded for re-attach like a training job, into the report."""
    pytest.importorskip("transformers")
    from tests.helpers import hf_models

    prefix = f"ofe{uuid.uuid4().hex[:6]}-"
    model = hf_models.save(hf_models.build("llama"), tmp_path / "models" / "tiny-llama")
    config = {"data": {"source": "stdlib", "max_documents": 60},
              "quant": {"bits": [8], "calib_batches": 1, "eval_batches": 1},
              "inspect": {"batches": 1, "batch_size": 2, "context": 16, "mem_gb": 2, "cpus_per_task": 1,
                          "timeout_min": 10},
              "studies": {"pretrained": {"models": [{"name": str(model), "step": 100}]}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "launcher.yaml").write_text(yaml.safe_dump(launcher(prefix)))
    out = run_snakemake(tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = settled_jobs(prefix, expected=1)
    assert len(jobs) == 1 and set(jobs.state) == {"COMPLETED"}, jobs
    assert jobs.name.iloc[0] == f"{prefix}inspect_tiny-llama_local"
    folder = tmp_path / "results" / "checkpoints" / "tiny-llama" / "local"
    info = json.loads((folder / "job.json").read_text())
    assert info["cluster"] == "slurm" and info["job_id"] == jobs.job_id.iloc[0]
    ck = pd.read_parquet(tmp_path / "results" / "checkpoints.parquet")
    assert list(ck.status) == ["completed"] and list(ck.step) == [100]
    assert "pretrained" in (tmp_path / "reports" / "index.html").read_text()
