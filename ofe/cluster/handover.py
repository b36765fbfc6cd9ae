"""The waiting rule's side of a SLURM run (`ofe launch` with `cluster: slurm`): hand the run over to the
workflow's dispatcher (`ofe.cluster.dispatch`), wait on its lock, and finish from its ended record.

    1. an ended record answering this very request (same digest): finish from it (the job's result,
       a packed member's result, or the state the job ended in) and return or raise, as before;
    2. a recorded job still pending or running (RUN/job.json, one shared queue listing): re-attach, i.e.
       ask the dispatcher to watch it;
    3. else ask it to submit the run.
Then wait until the dispatcher holds the request's lock, and block on that lock. From the CLI the
waiting is a `flock` process that replaces this Python process (`exec_wait`): about 2 MB per run in
flight instead of about 28 MB. When the lock is freed, `flock` runs the same `ofe launch` line again,
which lands in step 1, or, if the dispatcher died without an answer, hands the run over once more.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ofe.cluster import dispatch, spool
from ofe.cluster.jobstate import StatusCache, live_job
from ofe.io import atomic_write_text
from ofe.runfolder import ERROR, JOB

TAKE_TIMEOUT_S = 180.0


def fail(out: Path, job_id: str, e: BaseException | str, what: str = "training") -> RuntimeError:
    """The RuntimeError a waiting rule fails with; its text (with the traceback) also goes to RUN/error.txt."""
    text = e if isinstance(e, str) else f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    atomic_write_text(out / ERROR, text)
    return RuntimeError(f"{what} job {job_id} for {out} failed:\n{text}")


def hand_over(work: Any, out: Path, params: dict[str, Any], launcher: dict[str, Any], status_dir: Path,
              exec_wait: bool = False) -> dict[str, Any]:
    """Steps 1-3 of the module's docstring for `work` (an `ofe.cluster.launch.Work`) in folder `out`,
    submitted with the submitit `params`; returns the job's result (the run's summary)."""
    status_dir = status_dir.resolve()
    key = spool.run_key(out)
    pack = int(((launcher.get("scales") or {}).get(work.scale) or {}).get("pack", 1)) if work.kind == "train" else 1
    payload = {"kind": work.kind, "args": list(work.args), "params": params, "pack": pack}
    digest = spool.digest(payload)
    while True:
        ended = spool.read_json(spool.ended_path(status_dir, key))
        if ended is not None:
            spool.ended_path(status_dir, key).unlink(missing_ok=True)
            spool.hold_path(status_dir, ended["token"]).unlink(missing_ok=True)
            if ended.get("digest") == digest:
                return _finish(ended, out, work.what)
        poll = float(launcher.get("poll_s", 15))
        info = live_job(out / JOB, StatusCache(status_dir, max_age_s=poll))
        request: dict[str, Any] = {"key": key, "token": spool.new_token(), "digest": digest, "out": str(out),
                                   "poll_s": poll, "gather_s": float(launcher.get("gather_s", 10)),
                                   "array": bool(launcher.get("array", False)), "scale": work.scale,
                                   "prefix": launcher.get("job_name_prefix", "ofe-"), "cwd": os.getcwd(), **payload,
                                   **spool.pid_record()}
        if info is not None and info["cluster"] != "slurm":
            raise RuntimeError(f"{out} has a live {info['cluster']} job {info['job_id']} (job.json); wait for it "
                               f"with the {info['cluster']} launcher, or stop it (python -m ofe cancel), then rerun")
        if info is not None:
            print(f"[ofe] re-attaching to SLURM job {info['job_id']} for {out}", flush=True)
            request.update(action="watch", job=info)
        else:
            (out / ERROR).unlink(missing_ok=True)
            (out / spool.MEMBER_RESULT).unlink(missing_ok=True)
            if work.before_submit is not None:
                work.before_submit(params)
            request["action"] = "submit"
        spool.write_request(status_dir, request)
        _wait_taken(status_dir, request)
        hold = spool.hold_path(status_dir, request["token"])
        print(f"[ofe] {work.what} of {out} handed to the dispatcher ({status_dir / spool.DISPATCH_LOG}); "
              f"waiting for its job" + ("" if info is None else f" {info['job_id']}"), flush=True)
        if exec_wait and shutil.which("flock"):
            # this process becomes `flock`, which blocks on the lock, then runs this same command again
            argv = [sys.executable, "-m", "ofe", *sys.argv[1:]]
            lock_fd = os.environ.get("OFE_RUN_LOCK_FD", "").partition(":")[0]
            if lock_fd:  # the run folder's lock (`ofe.cluster.launch.run_lock`) stays held across the exec
                os.set_inheritable(int(lock_fd), True)
            sys.stdout.flush()
            os.execvp("flock", ["flock", "-s", str(hold), *argv])
        with hold.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_SH)  # blocks until the dispatcher lets the run go


def _wait_taken(status_dir: Path, request: dict[str, Any]) -> None:
    """Until the dispatcher holds the request's lock (or has already answered it), starting one if none
    is alive; a dispatcher that cannot start is an error naming its log."""
    hold, ended = spool.hold_path(status_dir, request["token"]), spool.ended_path(status_dir, request["key"])
    start = last_start = time.time()
    dispatch.ensure(status_dir)
    while not spool.held(hold):
        answer = spool.read_json(ended)
        if answer is not None and answer.get("token") == request["token"]:
            return
        if time.time() - start > TAKE_TIMEOUT_S:
            log = status_dir / spool.DISPATCH_LOG
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
            raise RuntimeError(f"no dispatcher took {request['out']} in {TAKE_TIMEOUT_S:.0f} s; its log "
                               f"{log} ends with:\n{tail}")
        if time.time() - last_start > 5:  # it may have exited (idle) just before the request came
            dispatch.ensure(status_dir)
            last_start = time.time()
        time.sleep(0.05)


def _finish(ended: dict[str, Any], out: Path, what: str) -> dict[str, Any]:
    """The job's result from the dispatcher's ended record; raises (and writes RUN/error.txt) for a failure."""
    job = ended.get("job") or {}
    job_id = str(job.get("job_id", "-"))
    log = Path(job["stdout"]) if job.get("stdout") else None
    if log is not None and log.exists():  # the job's output, into the rule's log
        sys.stdout.write(log.read_text(errors="replace"))
        sys.stdout.flush()
    outcome = ended["outcome"]
    if outcome == "submit_error":
        raise fail(out, "(not submitted)", f"submission failed: {ended['error']}", what)
    if outcome == "member":
        result = json.loads((out / spool.MEMBER_RESULT).read_text())
        if result.get("ok"):
            return result["summary"]
        raise fail(out, job_id, result.get("error", "no error recorded"), what)
    if outcome == "result":
        import submitit

        try:
            return submitit.SlurmJob(folder=job["folder"], job_id=job_id).results()[0]
        except Exception as e:  # submitit's FailedJobError carries the remote traceback
            raise fail(out, job_id, e, what) from None
    raise fail(out, job_id, f"SLURM job {job_id} ended {ended.get('state')} without a result; its log: {log}", what)
