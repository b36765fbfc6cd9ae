"""submitit launch (local executor): the job's result comes back; a failing job fails with its traceback."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

import ofe.cluster.jobstate as jobstate
from ofe.cluster.jobstate import SchedulerUnavailable, StatusCache
from ofe.cluster.launch import Work, cancel, launch, launch_work, run_lock
from ofe.config import ConfigError
from tests.helpers.launch_probe import EnvProbe
from tests.helpers.runs import tiny_run

pytestmark = pytest.mark.slow  # starts processes: submitit jobs (local executor)

LOCAL = {"cluster": "local", "poll_s": 0.2, "timeout_min": 5}


def test_local_launch_trains_and_records_the_job(data_dir, tmp_path, capsys):
    summary = launch(tiny_run(data_dir, train={"steps": 4}), tmp_path, LOCAL)
    assert summary["status"] == "completed" and summary["device_type"] == "cpu"
    assert json.loads((tmp_path / "summary.json").read_text())["steps_done"] == 4
    job = json.loads((tmp_path / "job.json").read_text())
    assert job["cluster"] == "local" and job["job_id"]
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 4
    assert "[ofe] step 4/4" in capsys.readouterr().out  # the job's progress reaches the rule's log


def test_failing_job_raises_with_its_traceback(tmp_path):
    cfg = replace(tiny_run(tmp_path / "nowhere"), data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match="failed") as err:
        launch(cfg, tmp_path / "run", LOCAL)
    assert "meta.json is missing" in str(err.value)
    assert "meta.json is missing" in (tmp_path / "run" / "error.txt").read_text()
    assert not (tmp_path / "run" / "summary.json").exists()


# ---- the GPUs a local job sees ------------------------------------------------------------------

def _probe(out: Path, tasks: int = 1, **launcher) -> dict:
    """Submit `EnvProbe` as a local job with these launcher settings; what its task 0 saw."""
    work = Work((str(out),), "probe", "probe", "", ("env0.json",), "probe", call=EnvProbe())
    return launch_work(work, out, {**LOCAL, "tasks_per_node": tasks, **launcher}, None)


@pytest.mark.parametrize("parent, gpus_per_node, seen", [
    (None, None, None),  # unset: every GPU, as the launching process
    ("", None, ""),  # hidden stays hidden
    ("GPU-1f0e3c2a,GPU-9b7d5e4f", None, "GPU-1f0e3c2a,GPU-9b7d5e4f"),  # UUIDs, not just indices
    ("GPU-1f0e3c2a,GPU-9b7d5e4f", 1, "GPU-1f0e3c2a"),  # the first N of the launching process's
    ("3,5,6", 2, "3,5"),  # not 0,1: submitit would count from 0 whatever the mask
    ("3,5", 0, ""),  # asked for none
])
def test_a_local_job_sees_the_gpus_of_the_launching_process(tmp_path, monkeypatch, parent, gpus_per_node, seen):
    """submitit's local executor would give the job CUDA_VISIBLE_DEVICES="" without gpus_per_node (a
    GPU workstation training on CPU) and 0..N-1 with it; the job gets the launching process's own."""
    if parent is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", parent)
    launcher = {} if gpus_per_node is None else {"gpus_per_node": gpus_per_node}
    assert _probe(tmp_path, **launcher) == {"local_rank": None, "cuda_visible": seen}


def test_every_task_of_a_local_job_keeps_the_mask_and_its_local_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    _probe(tmp_path, tasks=2)
    seen = [json.loads((tmp_path / f"env{r}.json").read_text()) for r in (0, 1)]
    # never CUDA_VISIBLE_DEVICES=LOCAL_RANK (submitit's export default): each takes cuda:LOCAL_RANK of 3,5
    assert seen == [{"local_rank": "0", "cuda_visible": "3,5"}, {"local_rank": "1", "cuda_visible": "3,5"}]


def test_more_gpus_than_visible_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ConfigError, match=r"gpus_per_node: 3, but this process sees 2 GPU\(s\) "
                                          r"\(CUDA_VISIBLE_DEVICES='0,1'\)"):
        _probe(tmp_path / "listed", gpus_per_node=3)
    assert not (tmp_path / "listed" / "job.json").exists()  # refused before any submission
    # unset: every GPU of the machine, counted in the job, where CUDA drops the indices naming none
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(RuntimeError, match=r"gpus_per_node: 64, but the job sees \d+ GPU\(s\) with "
                                           r"CUDA_VISIBLE_DEVICES='0,1,2,"):
        _probe(tmp_path / "counted", gpus_per_node=64)


# ---- job liveness ---------------------------------------------------------------------------------

def _start_ticks(pid: int) -> int:
    """Field 22 of /proc/PID/stat (proc(5)), read here independently of ofe.cluster.launch."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19])  # field 3 is fields[0]


def live_job(out: Path) -> dict | None:
    return jobstate.live_job(out / "job.json", StatusCache(out / ".ofe-status", max_age_s=2.0))


def _record(out: Path, **info) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.json").write_text(json.dumps({"job_id": "123", "folder": str(out / "submitit"), **info}))


def test_a_reused_pid_is_not_taken_for_the_job(tmp_path):
    me = os.getpid()
    _record(tmp_path / "same", cluster="local", pid=me, pid_start=_start_ticks(me))
    _record(tmp_path / "reused", cluster="local", pid=me, pid_start=_start_ticks(me) + 1)
    assert live_job(tmp_path / "same") is not None
    assert live_job(tmp_path / "reused") is None  # same pid, another process


class _Clock:
    """ofe.cluster.jobstate's clock: real time plus every sleep, which returns at once, so back-offs of minutes
    take no test time and still order the shared cache's timestamps."""

    def __init__(self) -> None:
        self.slept = 0.0

    def time(self) -> float:
        return time.time() + self.slept

    def sleep(self, seconds: float) -> None:
        self.slept += max(seconds, 0.0)


def _fake_slurm(tmp_path: Path, monkeypatch, squeue: str, sacct: str) -> Path:
    """squeue and sacct scripts on PATH that log each call to calls.txt and run the given body."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("squeue", squeue), ("sacct", sacct)):
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\necho {name} >> {tmp_path}/calls.txt\n{body}\n")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(jobstate, "time", _Clock())
    return tmp_path / "calls.txt"


def test_a_failing_scheduler_is_retried_and_never_read_as_job_gone(tmp_path, monkeypatch):
    calls = _fake_slurm(tmp_path, monkeypatch, "echo 'slurm_load_jobs error: Socket timed out' >&2; exit 1",
                        "exit 1")
    out = tmp_path / "run"
    _record(out, cluster="slurm")
    with pytest.raises(SchedulerUnavailable, match="not resubmitting"):
        launch(tiny_run(tmp_path), out, {"cluster": "slurm"})
    assert calls.read_text().split().count("squeue") == 6  # retried, with back-off
    assert not (out / "submitit").exists()  # nothing was submitted


def test_a_transient_scheduler_failure_then_running_is_live(tmp_path, monkeypatch):
    counter = tmp_path / "n"
    squeue = (f"n=$(cat {counter} 2>/dev/null || echo 0); echo $((n+1)) > {counter}; "
              "if [ $n -lt 2 ]; then exit 1; fi; echo '123|RUNNING'")
    calls = _fake_slurm(tmp_path, monkeypatch, squeue, "exit 1")
    _record(tmp_path / "run", cluster="slurm")
    assert live_job(tmp_path / "run")["job_id"] == "123"
    assert calls.read_text().split() == ["squeue"] * 3


def test_a_job_that_left_the_queue_is_not_live(tmp_path, monkeypatch):
    calls = _fake_slurm(tmp_path, monkeypatch, "echo '5|RUNNING'", "echo '123|COMPLETED'")
    _record(tmp_path / "run", cluster="slurm")
    assert live_job(tmp_path / "run") is None
    assert calls.read_text().split() == ["squeue"]


N_RECORDS = 20  # jobs 1001..1015 are in the queue, 1016..1020 have ended and left it


def _twenty_records(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    listing = "; ".join(f"echo '{1000 + i}|{'PENDING' if i % 2 else 'RUNNING'}'" for i in range(1, 16))
    calls = _fake_slurm(tmp_path, monkeypatch, f"{listing}; echo '999|RUNNING'", "echo '1016|COMPLETED'")
    results = tmp_path / "results"
    for i in range(1, N_RECORDS + 1):
        _record(results / "runs" / f"r{i:02d}", cluster="slurm", job_id=str(1000 + i), submitted=time.time())
    return results, calls


def _restarted_rule(results: str, run: str, queue) -> None:
    cache = StatusCache(Path(results) / ".ofe-status", max_age_s=15)  # as launch builds it (poll_s 15)
    info = jobstate.live_job(Path(results) / "runs" / run / "job.json", cache)
    queue.put((run, info and info["job_id"]))


def test_cancel_and_re_attach_ask_the_scheduler_once_for_twenty_jobs(tmp_path, monkeypatch):
    results, calls = _twenty_records(tmp_path, monkeypatch)
    live = [str(1000 + i) for i in range(1, 16)]
    jobs = cancel(results, dry_run=True)
    assert [j.split()[2] for j in jobs] == live
    assert len(calls.read_text().split()) <= 2  # not one query per job
    # a head restarted with twenty runs: its rules check their jobs at once, in twenty processes
    calls.unlink()
    (results / ".ofe-status" / "slurm-status.json").unlink()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_restarted_rule, args=(str(results), f"r{i:02d}", queue))
             for i in range(1, N_RECORDS + 1)]
    for proc in procs:
        proc.start()
    found = dict(queue.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(10)
    assert sorted(j for j in found.values() if j) == live
    assert len(calls.read_text().split()) <= 2


def test_a_run_folder_is_locked_while_a_head_waits_on_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with run_lock(out):
        with pytest.raises(RuntimeError, match="being launched by another ofe process"):
            launch(tiny_run(tmp_path, train={"steps": 4}), out, LOCAL)
    assert not (out / "job.json").exists()
    with run_lock(out):  # released on exit
        pass
