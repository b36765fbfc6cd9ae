"""The unattended head (`python -m ofe head`) on a real single-node SLURM: the Snakemake head runs as a
SLURM job; killing it mid-sweep and starting it again re-attaches to the training jobs in flight and
submits none twice."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from ofe.cluster.jobstate import pid_alive
from tests.helpers import REPO
from tests.helpers.services import require_service
from tests.helpers.slurm import HOW, counting_sbatch, settled_jobs, slurm_up, workflow_dir

pytestmark = pytest.mark.slow  # submits a Snakemake head and its training jobs to a real SLURM


@pytest.fixture(scope="module", autouse=True)
def slurm() -> None:
    require_service(slurm_up(), "a SLURM controller with accounting (sacct)", HOW)


def _queue() -> dict[str, tuple[str, str]]:
    """{job id: (name, state)} of the controller's queue."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%j|%T"], capture_output=True, text=True, check=True).stdout
    return {i: (n, s) for i, n, s in (line.split("|") for line in out.splitlines() if line.strip())}


def _wait(what: str, done, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not done():
        if time.time() > deadline:
            tail = log.read_text()[-3000:] if log.exists() else "(no head log)"
            pytest.fail(f"timed out waiting for {what}; head log:\n{tail}")
        time.sleep(1)


def test_a_killed_head_job_restarts_and_reattaches_without_duplicates(tmp_path):
    prefix = f"ofe{uuid.uuid4().hex[:6]}-"
    head_name = f"{prefix}head"
    (tmp_path / "work").mkdir()
    wd = workflow_dir(tmp_path / "work", prefix, steps=3000)  # ~30 s of training per run
    env, submitted = counting_sbatch(tmp_path)
    # the head job inherits this environment (sbatch exports it): this checkout's ofe, the counting sbatch
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # the test's own launcher file replaces the profile's (same key), keeping the profile's other settings
    cmd = [sys.executable, "-m", "ofe", "head", "--job-name", head_name, "--", "-s", str(REPO / "Snakefile"),
           "--profile", str(REPO / "profiles" / "slurm"), "--config", f"launcher_file={wd / 'launcher.yaml'}",
           "--latency-wait", "5"]
    results, runs_dir = wd / "results", wd / "results" / "runs"
    log = results / "logs" / "head.log"

    def ours() -> dict[str, tuple[str, str]]:
        return {i: ns for i, ns in _queue().items() if ns[0].startswith(prefix)}

    def training() -> list[str]:
        return [s for n, s in ours().values() if n != head_name]

    try:
        first = subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        head_id = json.loads((results / "head.json").read_text())["job_id"]
        assert f"submitted head job {head_id}" in first.stdout
        again = subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 1 and f"head job {head_id} is already" in again.stderr

        # both runs mid-training: their jobs running, a checkpoint written, no summary yet
        _wait("both training jobs to run", lambda: training() == ["RUNNING", "RUNNING"]
              and len(list(runs_dir.rglob("checkpoint.pt"))) == 2, log)
        subprocess.run(["scancel", head_id], check=True)
        _wait("the head job to leave the queue", lambda: head_id not in _queue(), log, timeout=120)
        # nothing of the killed head runs on beside the next one (its Snakemake included)
        pid = int(re.search(r"snakemake runs as process (\d+)", log.read_text()).group(1))
        assert not pid_alive(pid)  # a zombie left for init to reap counts as gone
        assert training() == ["RUNNING", "RUNNING"]  # the jobs live on without their head
        assert not list(runs_dir.rglob("summary.json"))
        # --max-age 0: the shared cache was last refreshed by the killed head's waiters, when it still ran
        status = subprocess.run([sys.executable, "-m", "ofe", "status", "--results", str(results), "--max-age", "0"],
                                cwd=wd, env=env, capture_output=True, text=True, timeout=120)
        assert f"head: SLURM job {head_id} is not running" in status.stdout, status.stdout + status.stderr

        restart = subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True, timeout=120)
        assert restart.returncode == 0, restart.stderr
        second_id = json.loads((results / "head.json").read_text())["job_id"]
        assert second_id != head_id
        _wait("the report", lambda: (results / "report.json").exists(), log, timeout=600)
        _wait("the second head job to end", lambda: second_id not in _queue(), log, timeout=120)
    finally:  # never leave this test's jobs behind; never touch anyone else's
        for job_id in ours():
            subprocess.run(["scancel", job_id], check=False)

    names = submitted()
    # each run was submitted exactly once: the restarted head re-attached instead of resubmitting
    assert names.count(head_name) == 2, names
    trained = [n for n in names if n != head_name]
    assert len(trained) == len(set(trained)) == 2 and all(n.startswith(prefix) for n in trained), names
    text = log.read_text()
    assert f"head job {head_id} (start 1)" in text and f"head job {second_id} (start 1)" in text
    assert "snakemake exited with status 0" in text
    logs = "".join(p.read_text() for p in (results / "logs" / "train").rglob("*.log"))
    assert logs.count("re-attaching to SLURM job") == 2
    jobs = settled_jobs(prefix, expected=4)
    states = jobs.state.str.split().str[0]  # "CANCELLED by 0" -> CANCELLED
    assert sorted(states[jobs.name != head_name]) == ["COMPLETED", "COMPLETED"], jobs
    assert sorted(states[jobs.name == head_name]) == ["CANCELLED", "COMPLETED"], jobs
    runs = pd.read_parquet(results / "runs.parquet")
    assert len(runs) == 2 and set(runs.status) == {"completed"} and set(runs.steps_done) == {3000}
    metrics = pd.read_parquet(results / "metrics.parquet")
    assert set(metrics.run_id) == set(runs.run_id)


def test_a_head_near_its_time_limit_requeues_itself(tmp_path):
    """SLURM's USR1 before the time limit reaches the script, which requeues the head: the same job starts
    again (unlock, then Snakemake) instead of ending as TIMEOUT. Snakemake runs a one-rule workflow that
    only sleeps: what is tested is the head job's own life."""
    name = f"ofe{uuid.uuid4().hex[:6]}-head"
    (tmp_path / "Snakefile").write_text('rule all:\n    shell: "sleep 600"\n')
    results = tmp_path / "results"
    log = results / "logs" / "head.log"
    # a 2-minute limit, USR1 90 s before it (SLURM may send it up to a minute early)
    cmd = [sys.executable, "-m", "ofe", "head", "--job-name", name, "--time", "2", "--requeue-before-s", "90",
           "--results", str(results), "--", "-s", str(tmp_path / "Snakefile"), "--cores", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    job_id = None
    try:
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        job_id = json.loads((results / "head.json").read_text())["job_id"]
        restart = f"head job {job_id} (start 2)"
        _wait("the head to be requeued and run Snakemake again", lambda: log.exists() and restart in log.read_text()
              and "snakemake runs as process" in log.read_text().split(restart)[1], log, timeout=300)
    finally:
        if job_id is not None:
            subprocess.run(["scancel", job_id], check=False)
    text = log.read_text()
    first, second = text.index(f"head job {job_id} (start 1)"), text.index(f"head job {job_id} (start 2)")
    assert first < text.index(f"time limit near: requeueing head job {job_id}") < second
    assert text.count("Unlocked working directory") == 2  # each start removes the killed head's lock
