"""The dispatcher's submissions (ofe/cluster/dispatch.py) with a stand-in for submitit's executor: which
runs go into which job, with what resources, and what each run's job.json says; the ended record and
the lock a waiter blocks on; packing refused where it cannot work; a SLURM job's environment kept out
of the jobs a head job submits; the run folder's lock carried across the waiter's exec."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import submitit

from ofe.cluster import dispatch, spool
from ofe.cluster.jobstate import process_start_time
from ofe.cluster.launch import LOCK_FD_ENV, run_lock
from ofe.cluster.pack import member_log
from ofe.config import ConfigError
from ofe.plan.launcher import check_packing
from tests.helpers import REPO


class FakeJob:
    def __init__(self, job_id: str, folder: Path) -> None:
        self.job_id = job_id
        self.paths = type("Paths", (), {"stdout": folder / f"{job_id}_0_log.out"})()


class FakeExecutor:
    """Records what would be submitted: one sbatch per `submit`, or one for a whole `batch`."""

    made: list["FakeExecutor"] = []

    def __init__(self, folder: Path, cluster: str) -> None:
        self.folder, self.params, self.sbatch, self.calls, self._batch = Path(folder), {}, [], [], None
        FakeExecutor.made.append(self)

    def update_parameters(self, **params) -> None:
        self.params.update(params)

    @contextlib.contextmanager
    def batch(self):
        self._batch = []
        yield
        array = str(100 + len(self.sbatch))
        for i, job in enumerate(self._batch):
            job.job_id = f"{array}_{i}"
        self.sbatch.append(("array", len(self._batch), dict(self.params)))
        self._batch = None

    def submit(self, fn, *args) -> FakeJob:
        self.calls.append((type(fn).__name__, args))
        job = FakeJob("pending", self.folder)
        if self._batch is not None:
            self._batch.append(job)
        else:
            job.job_id = str(100 + len(self.sbatch))
            self.sbatch.append(("job", 1, dict(self.params)))
        return job


def _request(status: Path, out: Path, pack: int, array: bool) -> dict:
    req = {"key": spool.run_key(out), "token": spool.new_token(), "digest": "d", "out": str(out), "poll_s": 1,
           "gather_s": 0, "array": array, "scale": "tiny", "prefix": "ofe-", "kind": "train", "action": "submit",
           "args": [str(out / "config.json"), str(out), {"bits": [8]}], "pack": pack,
           "params": {"cpus_per_task": 1, "mem_gb": 2, "timeout_min": 10, "name": f"ofe-{out.name}"},
           "pid": os.getpid(), "pid_start": process_start_time(os.getpid())}
    out.mkdir(parents=True)
    spool.write_request(status, req)
    return req


@pytest.mark.parametrize("pack, array, expected", [
    (2, True, [("array", 3)]),                   # 5 runs -> packs of 2, 2 and 1, one sbatch
    (1, True, [("array", 5)]),
    (2, False, [("job", 1)] * 3),
    (1, False, [("job", 1)] * 5),
])
def test_runs_handed_over_together_are_packed_and_batched(tmp_path, monkeypatch, pack, array, expected) -> None:
    monkeypatch.setattr(submitit, "AutoExecutor", FakeExecutor)
    FakeExecutor.made = []
    status = tmp_path / "status"
    requests = [_request(status, tmp_path / f"run{i}", pack, array) for i in range(5)]
    entries: dict = {}
    dispatch._take(status, entries)
    assert len(entries) == 5 and not list((status / spool.REQUESTS).iterdir())
    assert all(spool.held(spool.hold_path(status, r["token"])) for r in requests)  # the waiters block on these
    dispatch._submit_ready(status, entries)
    [executor] = FakeExecutor.made
    assert [(kind, n) for kind, n, _ in executor.sbatch] == expected
    params = executor.sbatch[0][2]
    assert (params["cpus_per_task"], params["mem_gb"]) == ((2, 4.0) if pack == 2 else (1, 2))  # per run x pack
    if pack == 2:
        assert [name for name, _ in executor.calls] == ["PackJob"] * 3
        assert [len(args[0]) for _, args in executor.calls] == [2, 2, 1]
        assert params["name"] == "ofe-tiny-pack2" + ("x3" if array else "")
    else:
        assert [name for name, _ in executor.calls] == ["TrainJob"] * 5
    records = {r["out"]: json.loads((Path(r["out"]) / "job.json").read_text()) for r in requests}
    for r in requests:
        rec = records[r["out"]]
        assert rec["token"] == r["token"] and rec["cluster"] == "slurm"
        if pack == 2:
            assert rec["stdout"] == str(member_log(rec["folder"], rec["job_id"], rec["pack"]["index"]))
    ids = [records[r["out"]]["job_id"] for r in requests]
    assert len(set(ids)) == (3 if pack == 2 else 5)


def test_a_member_result_ends_the_run_and_frees_its_waiter(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(submitit, "AutoExecutor", FakeExecutor)
    status = tmp_path / "status"
    first, second = (_request(status, tmp_path / f"run{i}", 2, True) for i in range(2))
    entries: dict = {}
    dispatch._take(status, entries)
    dispatch._submit_ready(status, entries)
    job_id = json.loads((Path(first["out"]) / "job.json").read_text())["job_id"]
    (Path(first["out"]) / spool.MEMBER_RESULT).write_text(json.dumps({"job_id": job_id, "ok": True}))
    (Path(second["out"]) / spool.MEMBER_RESULT).write_text(json.dumps({"job_id": "an-earlier-job", "ok": True}))
    cache = type("Cache", (), {"register": lambda s, j: None, "unregister": lambda s, j: None,
                               "state": lambda s, j: "RUNNING"})()
    dispatch._check(status, entries, cache)
    ended = spool.read_json(spool.ended_path(status, first["key"]))
    assert ended["outcome"] == "member" and ended["token"] == first["token"] and ended["job"]["job_id"] == job_id
    assert not spool.held(spool.hold_path(status, first["token"]))
    # the neighbour's file is from another job: it is still running, its waiter still blocked
    assert spool.read_json(spool.ended_path(status, second["key"])) is None
    assert spool.held(spool.hold_path(status, second["token"])) and list(entries) == [second["key"]]


def test_a_request_of_a_dead_waiter_is_dropped(tmp_path) -> None:
    status = tmp_path / "status"
    req = _request(status, tmp_path / "run", 1, True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    spool.write_request(status, {**req, "pid": int(dead.stdout), "pid_start": None})
    entries: dict = {}
    dispatch._take(status, entries)
    assert entries == {} and not list((status / spool.REQUESTS).iterdir())


def test_a_run_whose_waiter_dies_while_gathered_is_not_submitted(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(submitit, "AutoExecutor", FakeExecutor)
    FakeExecutor.made = []
    status = tmp_path / "status"
    waiter = subprocess.Popen(["sleep", "60"])
    req = _request(status, tmp_path / "run", 1, True)
    spool.write_request(status, {**req, "pid": waiter.pid, "pid_start": process_start_time(waiter.pid)})
    entries: dict = {}
    dispatch._take(status, entries)
    assert list(entries) == [req["key"]]
    waiter.kill()  # Ctrl-C of the head, within the gathering window
    waiter.wait()
    dispatch._submit_ready(status, entries)
    assert entries == {} and FakeExecutor.made == [] and not spool.held(spool.hold_path(status, req["token"]))


@pytest.mark.parametrize("launcher, key", [
    ({"cluster": "local", "scales": {"tiny": {"pack": 4}}}, "launcher.scales.tiny.pack: 4 needs cluster: slurm"),
    ({"cluster": "local", "array": True}, "launcher.array: true needs cluster: slurm"),
    ({"cluster": "slurm", "scales": {"130m": {"pack": 2, "gpus_per_node": 1}}}, "130m has gpus_per_node 1"),
    ({"cluster": "slurm", "tasks_per_node": 8, "scales": {"tiny": {"pack": 2}}}, "tiny has tasks_per_node 8"),
])
def test_packing_is_refused_where_it_cannot_work(launcher, key) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_packing(launcher)
    check_packing({"cluster": "slurm", "array": True, "scales": {"tiny": {"pack": 8, "gpus_per_node": 0}}})


def test_a_head_jobs_slurm_settings_stay_out_of_its_submissions() -> None:
    env = {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "1", "SBATCH_PARTITION": "x", "SRUN_CPUS_PER_TASK": "1",
           "SLURM_CONF": "/etc/slurm/slurm.conf", "PATH": "/bin", "OFE_SLURM_PARTITION": "gpu"}
    assert spool.slurm_free_env(env) == {"SLURM_CONF": "/etc/slurm/slurm.conf", "PATH": "/bin",
                                         "OFE_SLURM_PARTITION": "gpu"}


LOCKER = """
import sys
from pathlib import Path
from ofe.cluster.launch import run_lock
try:
    with run_lock(Path(sys.argv[1])):
        print("locked")
except RuntimeError as e:
    print("refused" if "being launched by another" in str(e) else e)
"""


def test_the_run_folders_lock_passes_to_the_waiters_next_process_only(tmp_path) -> None:
    """The waiter becomes `flock`, which runs `ofe launch` again: that process adopts the lock it inherited;
    any other process is refused while the first holds it."""
    with run_lock(tmp_path):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        fd = int(os.environ[LOCK_FD_ENV].partition(":")[0])
        os.set_inheritable(fd, True)
        heir = subprocess.run([sys.executable, "-c", LOCKER, str(tmp_path)], env=env, pass_fds=(fd,),
                              capture_output=True, text=True, timeout=60)
        other = subprocess.run([sys.executable, "-c", LOCKER, str(tmp_path)], capture_output=True, text=True,
                               env={k: v for k, v in env.items() if k != LOCK_FD_ENV}, timeout=60)
    assert heir.stdout.split() == ["locked"], heir.stderr
    assert other.stdout.split() == ["refused"], other.stderr
    assert LOCK_FD_ENV not in os.environ


def test_a_packed_member_that_fails_leaves_its_neighbour_to_finish(tmp_path, data_dir) -> None:
    """A packed job (here through submitit's local executor) of a good run and one whose data is missing:
    the job itself succeeds, each member says how it ended in its own folder, with the job's id."""
    from ofe.cluster.pack import PackJob, member_result
    from tests.helpers.runs import tiny_run

    members = []
    for name, data in (("good", data_dir), ("bad", tmp_path / "no-data")):
        out = tmp_path / name
        out.mkdir()
        (out / "config.json").write_text(tiny_run(data, train={"steps": 4}).to_json())
        members.append({"out": str(out), "config": str(out / "config.json"), "quant": None})
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="local")
    executor.update_parameters(timeout_min=5)
    job = executor.submit(PackJob(), members)
    assert job.result() == {str(tmp_path / "good"): True, str(tmp_path / "bad"): False}
    good, bad = member_result(tmp_path / "good"), member_result(tmp_path / "bad")
    assert good["ok"] and good["summary"]["status"] == "completed" and good["job_id"] == str(job.job_id)
    assert not bad["ok"] and "no-data" in bad["error"] and bad["job_id"] == str(job.job_id)
    assert (tmp_path / "good" / "summary.json").exists() and not (tmp_path / "bad" / "summary.json").exists()
    assert "[ofe] step 4/4" in member_log(tmp_path / "jobs", str(job.job_id), 0).read_text()


def test_status_says_whether_the_dispatcher_runs_and_what_it_holds(tmp_path) -> None:
    import fcntl

    assert spool.dispatcher_line(tmp_path) is None  # never on SLURM: nothing to say
    (tmp_path / spool.DISPATCH_LOG).write_text("")
    assert spool.dispatcher_line(tmp_path).startswith("dispatcher: not running")
    (tmp_path / spool.DISPATCH_STATE).write_text(json.dumps({"pid": 42, "time": 0, "gathering": 3, "waiting": 16,
                                                             "jobs": ["7_0", "7_1"]}))
    with (tmp_path / spool.DISPATCH_LOCK).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as the live dispatcher holds it
        line = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from ofe.cluster import "
                               "spool; print(spool.dispatcher_line(Path(sys.argv[1])))", str(tmp_path)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert "running (pid 42): 16 run(s) in 2 SLURM job(s), 3 being gathered" in line
