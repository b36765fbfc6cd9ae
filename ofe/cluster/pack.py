"""Packed runs: several small runs sharing one SLURM job (launcher `scales.<scale>.pack: N`).

Design. A packed job is one task given N x the scale's CPUs and memory; it starts each member as its
own process (`python -m ofe.cluster.pack MEMBER_JSON`), all at once, one member per scale's share of
CPUs, and waits for them. Own processes rather than SLURM tasks of one step (srun -n N) because:
- a member that raises, or is killed (out of memory, a segfault), ends alone: its neighbours go on, and
  the job itself succeeds, so no site setting (KillOnBadExit, srun --wait) can take them down with it;
- requeue stays submitit's single-task path: on the time-limit or preemption signal the job's only
  task checkpoints (resubmits the same pack) and SLURM requeues it; every member then resumes from its
  own checkpoint, and a member that had already finished in this job is not run again;
- each member writes its own files as any run does, plus RUN/job-result.json (`MEMBER_RESULT`) the
  moment it ends, with the job id: its waiting rule needs nothing from its neighbours.
Members run one process each, never DDP: packing is refused for scales of several processes or GPUs
(`ofe.plan.validate.check_packing`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import submitit

from ofe.cluster.spool import MEMBER_RESULT
from ofe.io import atomic_write_json


def member_log(folder: Path | str, job_id: str, index: int) -> Path:
    """Where member `index` of job `job_id` writes its output (beside submitit's own logs)."""
    return Path(folder) / f"{job_id}_member{index}.out"


def member_result(out: Path | str) -> dict[str, Any] | None:
    try:
        return json.loads((Path(out) / MEMBER_RESULT).read_text())
    except (OSError, ValueError):
        return None


class PackJob(submitit.helpers.Checkpointable):
    """The callable of a packed job: runs its members side by side and returns {out: ended well}.
    Its default `checkpoint` resubmits the same members (submitit requeues the job)."""

    def __call__(self, members: list[dict[str, Any]]) -> dict[str, bool]:
        env = submitit.JobEnvironment()
        job_id, folder = str(env.job_id), Path(env.paths.folder)
        procs: dict[str, subprocess.Popen] = {}
        for index, member in enumerate(members):
            done = member_result(member["out"])
            if done is not None and done.get("job_id") == job_id and done.get("ok"):
                print(f"[ofe] member {index} ({member['out']}) already finished in this job", flush=True)
                continue
            log = member_log(folder, job_id, index).open("ab")
            spec = json.dumps({**member, "job_id": job_id})
            procs[member["out"]] = subprocess.Popen([sys.executable, "-u", "-m", "ofe.cluster.pack", spec],
                                                    stdout=log, stderr=subprocess.STDOUT)
            log.close()
            print(f"[ofe] member {index}: {member['out']} (pid {procs[member['out']].pid}, log "
                  f"{member_log(folder, job_id, index)})", flush=True)
        while procs:  # in whatever order they end: a member's waiter hears of its end at once
            for out, proc in list(procs.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del procs[out]
                mine = member_result(out)
                if mine is None or mine.get("job_id") != job_id:
                    # killed before it could say so itself (out of memory, a signal)
                    atomic_write_json(Path(out) / MEMBER_RESULT, {
                        "job_id": job_id, "ok": False, "time": time.time(),
                        "error": f"the run's process ended with exit status {rc} without a result "
                                 f"({'killed by signal ' + str(-rc) if rc < 0 else 'see its log'})"})
                print(f"[ofe] member {out} ended (exit status {rc})", flush=True)
            time.sleep(0.5)
        return {m["out"]: bool((member_result(m["out"]) or {}).get("ok")) for m in members}


def run_member(spec: dict[str, Any]) -> int:
    """One member, in its own process: train the run, quantise it, write RUN/job-result.json."""
    # the job's signals are the packing task's business: it requeues the job on SIGUSR2 (which SLURM
    # sends to every process of the step), and this process is then killed and later resumed
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    out = Path(spec["out"])
    record: dict[str, Any] = {"job_id": spec["job_id"]}
    try:
        from ofe.cluster.jobs import quantise_in_process
        from ofe.train.trainer import load_run_config, train

        summary = train(load_run_config(spec["config"]), out)
        if spec.get("quant") is not None:
            quantise_in_process(out, spec["quant"])
        record.update(ok=True, summary=summary)
    except BaseException as e:  # also SystemExit/KeyboardInterrupt: the waiter must hear of it
        record.update(ok=False, error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        print(record["error"], file=sys.stderr, flush=True)
    atomic_write_json(out / MEMBER_RESULT, {**record, "time": time.time()})
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    os.environ.pop("SUBMITIT_EXECUTOR", None)  # this process is a plain run, not a submitit task
    sys.exit(run_member(json.loads(sys.argv[1])))
