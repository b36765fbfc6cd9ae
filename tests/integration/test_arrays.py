"""Job arrays and packed runs through the slurm profile on the real localhost SLURM (issue 22): one sbatch
for runs that become ready together, packed members that fail or are cancelled alone, requeued array
tasks that resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import yaml

from ofe.train.trainer import load_run_config, train
from tests.helpers.services import require_service
from tests.helpers.slurm import HOW, counting_sbatch, launcher, settled_jobs, slurm_up, snakemake_cmd, workflow_dir

pytestmark = pytest.mark.slow  # Snakemake against a real SLURM


@pytest.fixture(scope="module", autouse=True)
def slurm() -> None:
    require_service(slurm_up(), "a SLURM controller with accounting (sacct)", HOW)


def grid_dir(tmp_path: Path, prefix: str, steps: int, seeds: list[int], pack: int) -> Path:
    """The tests' tiny workflow (pre_ln and op x `seeds`), submitted as arrays, `pack` runs per job."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    wd = workflow_dir(tmp_path, prefix, steps=steps)
    config = yaml.safe_load((wd / "config.yaml").read_text())
    config["studies"]["norms"]["grid"]["seed"] = seeds
    config["defaults"]["train"]["checkpoint_every"] = 50 if steps > 100 else 5
    (wd / "config.yaml").write_text(yaml.safe_dump(config))
    settings = {**launcher(prefix), "array": True, "gather_s": 2}
    settings["scales"]["tiny"]["pack"] = pack
    (wd / "launcher.yaml").write_text(yaml.safe_dump(settings))
    return wd


def jobs_of(wd: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(wd / "results" / "runs")): json.loads(p.read_text())
            for p in (wd / "results" / "runs").rglob("job.json")}


def wait_for_checkpoints(wd: Path, n: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while len(list((wd / "results" / "runs").rglob("checkpoint.pt"))) < n:
        assert time.time() < deadline, "the runs did not checkpoint in time"
        time.sleep(0.3)


def interrupted(wd: Path, env: dict[str, str], during: Callable[[], None]) -> str:
    """Run the workflow; once both runs have checkpointed, call `during` (the interruption). Returns the
    head's output, after asserting it succeeded."""
    head = subprocess.Popen(snakemake_cmd(wd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for_checkpoints(wd, 2)
        during()
        log, _ = head.communicate(timeout=600)
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)
    assert head.returncode == 0, log[-3000:]
    return log


def test_four_runs_are_one_array_of_two_packed_jobs_with_a_direct_runs_metrics(tmp_path):
    prefix = f"ofe{uuid.uuid4().hex[:6]}-"
    wd = grid_dir(tmp_path / "work", prefix, steps=20, seeds=[0, 1], pack=2)
    env, submitted = counting_sbatch(tmp_path)
    out = subprocess.run(snakemake_cmd(wd), env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(submitted()) == 1  # four runs, one sbatch
    jobs = settled_jobs(prefix, expected=2)
    assert sorted(jobs.state) == ["COMPLETED", "COMPLETED"], jobs
    array = jobs.job_id.str.split("_").str[0]
    assert array.nunique() == 1 and sorted(jobs.job_id.str.split("_").str[1]) == ["0", "1"], jobs
    records = jobs_of(wd)
    assert len(records) == 4
    by_job: dict[str, list[int]] = {}
    for rec in records.values():
        assert rec["pack"]["size"] == 2 and rec["job_id"] in set(jobs.job_id)
        by_job.setdefault(rec["job_id"], []).append(rec["pack"]["index"])
    assert sorted(sorted(v) for v in by_job.values()) == [[0, 1], [0, 1]]
    alloc = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,AllocCPUS", "-j", array.iloc[0]],
                           capture_output=True, text=True, check=True).stdout
    assert {line.split("|")[1] for line in alloc.split()} == {"2"}  # the pack holds its members' CPUs
    assert set(pd.read_parquet(wd / "results" / "runs.parquet").status) == {"completed"}
    # a packed member's numbers are a run's numbers: the same config trained here, directly
    run_id = sorted(records)[0]
    cfg = load_run_config(wd / "results" / "runs" / run_id / "config.json")
    train(replace(cfg, data_dir=str(wd / cfg.data_dir)), tmp_path / "direct")  # the workflow's relative path
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "direct" / "metrics.parquet"),
                                  pd.read_parquet(wd / "results" / "runs" / run_id / "metrics.parquet"))


def _member_pid(out: Path) -> int:
    """The process of the packed member training in folder `out` (its command line names the folder)."""
    found = subprocess.run(["pgrep", "-f", f"ofe.cluster.pack.*{out}"], capture_output=True, text=True).stdout.split()
    assert len(found) == 1, found
    return int(found[0])


def test_a_killed_packed_member_is_retried_alone_and_resumes(tmp_path):
    prefix = f"ofe{uuid.uuid4().hex[:6]}-"
    wd = grid_dir(tmp_path / "work", prefix, steps=3000, seeds=[0], pack=2)  # ~30 s of training per run
    env, submitted = counting_sbatch(tmp_path)
    victim = wd / "results" / "runs" / "tiny" / "op" / "beta0.2" / "adamw" / "lr0.01" / "seed0"
    first: list[str] = []

    def kill_one_member() -> None:
        first.append(json.loads((victim / "job.json").read_text())["job_id"])
        os.kill(_member_pid(victim), signal.SIGKILL)  # as the kernel's OOM killer would

    log = interrupted(wd, env, kill_one_member)
    records = jobs_of(wd)
    neighbour = records["tiny/pre_ln/beta1/adamw/lr0.01/seed0"]
    assert neighbour["job_id"] == first[0]  # finished in the first job, never resubmitted
    retried = records["tiny/op/beta0.2/adamw/lr0.01/seed0"]
    assert retried["job_id"] != first[0] and len(submitted()) == 2  # the pack, then the member alone
    assert "resumed" in Path(retried["stdout"]).read_text()
    assert "killed by signal 9" in log  # the first attempt's failure, as Snakemake showed it
    assert set(pd.read_parquet(wd / "results" / "runs.parquet").status) == {"completed"}


def test_requeued_and_cancelled_array_tasks_resume(tmp_path):
    """Two runs in one array (no packing): one task is requeued by SLURM (as a preemption does) and keeps
    its job id; the other is cancelled, so its rule retries it in a new job. Both resume."""
    prefix = f"ofe{uuid.uuid4().hex[:6]}-"
    wd = grid_dir(tmp_path / "work", prefix, steps=3000, seeds=[0], pack=1)
    env, submitted = counting_sbatch(tmp_path)
    before: dict[str, dict] = {}

    def requeue_one_cancel_the_other() -> None:
        before.update(jobs_of(wd))
        requeued, cancelled = sorted(before)
        assert {r["job_id"].split("_")[0] for r in before.values()} == {before[requeued]["job_id"].split("_")[0]}
        subprocess.run(["scontrol", "requeue", before[requeued]["job_id"]], check=True)
        subprocess.run(["scancel", before[cancelled]["job_id"]], check=True)

    interrupted(wd, env, requeue_one_cancel_the_other)
    requeued, cancelled = sorted(before)
    after = jobs_of(wd)
    assert after[requeued]["job_id"] == before[requeued]["job_id"]  # requeued in place
    assert after[cancelled]["job_id"] != before[cancelled]["job_id"] and len(submitted()) == 2
    for run_id in (requeued, cancelled):
        assert "resumed" in Path(after[run_id]["stdout"]).read_text(), run_id
    assert set(pd.read_parquet(wd / "results" / "runs.parquet").status) == {"completed"}
