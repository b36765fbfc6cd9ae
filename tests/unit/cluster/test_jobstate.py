"""One shared scheduler query per poll for all the processes that ask (the dispatcher, re-attaching rules,
`ofe status`), failures backed off and never read as "job gone". squeue and sacct are small scripts on PATH that count their calls."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from ofe.cluster.jobstate import StatusCache, is_live

N_JOBS = 50


def fake_scheduler(tmp_path: Path, monkeypatch) -> Path:
    """squeue lists jobs 1..N as RUNNING until `finished` exists (unless `broken` exists: exit 1);
    sacct then reports each asked-for job as COMPLETED. Every call is logged to calls.txt."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(f"""#!/bin/sh
echo squeue >> {tmp_path}/calls.txt
[ -e {tmp_path}/broken ] && {{ echo 'slurm_load_jobs error: Socket timed out' >&2; exit 1; }}
[ -e {tmp_path}/finished ] && exit 0
for i in $(seq 1 {N_JOBS}); do echo "$i|RUNNING"; done
""")
    (bin_dir / "sacct").write_text(f"""#!/bin/sh
echo sacct >> {tmp_path}/calls.txt
[ -e {tmp_path}/broken ] && exit 1
for arg in "$@"; do last="$arg"; done
echo "$last" | tr ',' '\\n' | while read -r id; do echo "$id|COMPLETED"; done
""")
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path / "calls.txt"


def _wait(folder: str, job_id: str, never: str, queue) -> None:
    """A process that polls its job's state every 0.1 s until the job has ended (as the dispatcher, a
    re-attaching rule and `ofe status` each read the shared cache)."""
    cache = StatusCache(folder, max_age_s=0.5)
    cache.register(job_id)
    while is_live(state := cache.state(job_id)):
        time.sleep(0.1)
    queue.put((job_id, state))


def _start_waiters(tmp_path: Path) -> tuple[list, multiprocessing.Queue]:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_wait, args=(str(tmp_path / "status"), str(i), str(tmp_path / "none"), queue))
             for i in range(1, N_JOBS + 1)]
    for p in procs:
        p.start()
    return procs, queue


@pytest.mark.slow  # starts fifty waiting processes
def test_fifty_waiting_rules_share_one_query_per_poll(tmp_path, monkeypatch):
    calls = fake_scheduler(tmp_path, monkeypatch)
    t0 = time.time()
    procs, queue = _start_waiters(tmp_path)
    time.sleep(3)
    assert all(p.is_alive() for p in procs)  # RUNNING jobs keep their rules waiting
    (tmp_path / "finished").touch()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(10)
    elapsed = time.time() - t0
    assert results == {str(i): "COMPLETED" for i in range(1, N_JOBS + 1)}
    log = calls.read_text().split()
    # at most one refresh per 0.5 s interval (plus slack for a refresh at the very start and end),
    # where one query per waiting rule and poll would be 50 x 10 per second
    assert log.count("squeue") <= elapsed / 0.5 + 3, (log.count("squeue"), elapsed)
    assert log.count("sacct") <= 4


def test_a_failing_scheduler_is_backed_off_and_never_read_as_gone(tmp_path, monkeypatch):
    calls = fake_scheduler(tmp_path, monkeypatch)
    (tmp_path / "broken").touch()
    (tmp_path / "finished").touch()  # the jobs have ended, but the scheduler cannot say so
    cache = StatusCache(tmp_path / "status", max_age_s=0.1)
    cache.register("7")
    for _ in range(30):
        assert cache.state("7") == "UNKNOWN"  # unknown, never "gone"
        time.sleep(0.05)
    assert 1 <= calls.read_text().split().count("squeue") <= 4  # backed off: 0.2, 0.4, 0.8 s, not 30 tries
    (tmp_path / "broken").unlink()
    time.sleep(2)  # past the back-off
    assert cache.state("7") == "COMPLETED"
