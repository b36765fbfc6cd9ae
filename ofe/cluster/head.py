"""`python -m ofe head`: the Snakemake head itself as a SLURM job, so no login session has to outlive the sweep.

The job asks for little (1 CPU, a few GB, no GPU) for long (7 days by default): it only plans, waits on
the training jobs and aggregates. It is `--requeue`d, so a preemption puts it back in the queue, and SLURM
sends its batch shell USR1 `requeue_before_s` before the time limit, which the script traps to `scontrol
requeue` itself: a time-out requeues it too instead of ending the sweep. On every (re)start the script
removes the lock a killed Snakemake leaves (`snakemake --unlock`) and runs Snakemake again from the
folder `ofe head` was run in; the profile's rerun-incomplete re-runs the rules the killed head left
unfinished, and each of them re-attaches to the job its run folder records (RUN/job.json) instead of
submitting a duplicate. The log is appended to across restarts (RESULTS/logs/head.log).

RESULTS/head.json records the submitted head; a second head for the same results folder is refused
while the recorded one is pending or running (one squeue), since two Snakemake heads on one folder
would unlock each other's lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ofe.cluster.jobstate import LIVE_STATES, is_live, queue_listing
from ofe.config import ConfigError
from ofe.io import atomic_write_json

RECORD, SCRIPT, LOG = "head.json", "head.sbatch", "logs/head.log"
DEFAULT_SNAKEMAKE_ARGS = ("--profile", "slurm")
# SLURM's --signal offset is a 16-bit count of seconds
MAX_SIGNAL_S = 65535
TIME_FORMAT = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class HeadError(RuntimeError):
    """The head cannot be submitted; the message says why and what to do."""


@dataclass
class HeadSettings:
    """The head job's resources. partition/account/qos default to the OFE_SLURM_* variables the training
    jobs use (not OFE_SLURM_CONSTRAINT: a GPU constraint would only delay a head that needs no GPU)."""

    job_name: str = "ofe-head"
    cpus: int = 1
    mem_gb: int = 4
    time: str = "7-00:00:00"
    requeue_before_s: int = 300
    partition: str | None = None
    account: str | None = None
    qos: str | None = None

    def check(self) -> None:
        """ConfigError naming the option and what it allows."""
        if self.cpus < 1:
            raise ConfigError(f"ofe head --cpus: must be at least 1, got {self.cpus}")
        if self.mem_gb < 1:
            raise ConfigError(f"ofe head --mem-gb: must be at least 1, got {self.mem_gb}")
        if not self.job_name or any(c.isspace() for c in self.job_name):
            raise ConfigError(f"ofe head --job-name: a non-empty name without spaces, got {self.job_name!r}")
        limit = time_limit_s(self.time)
        if not 0 < self.requeue_before_s < min(limit, MAX_SIGNAL_S + 1):
            raise ConfigError(f"ofe head --requeue-before-s: must be more than 0 and less than both the time "
                              f"limit ({limit} s) and {MAX_SIGNAL_S + 1}, got {self.requeue_before_s}")


def time_limit_s(text: str) -> int:
    """Seconds of a SLURM --time value: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
    days-hours:minutes or days-hours:minutes:seconds."""
    m = TIME_FORMAT.match(text.strip())
    if not m:
        raise ConfigError(f"ofe head --time: {text!r} is not a SLURM time limit; allowed: MM, MM:SS, HH:MM:SS, "
                          f"D-HH, D-HH:MM or D-HH:MM:SS (e.g. 7-00:00:00)")
    days, first, second, third = m.groups()
    parts = [int(p) for p in (first, second, third) if p is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        h, mi, s = (parts + [0, 0])[:3]
        seconds = ((int(days) * 24 + h) * 60 + mi) * 60 + s
    elif len(parts) == 3:
        seconds = (parts[0] * 60 + parts[1]) * 60 + parts[2]
    else:  # MM or MM:SS
        seconds = parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)
    if seconds <= 0:
        raise ConfigError(f"ofe head --time: must be a positive time limit, got {text!r}")
    return seconds


def settings_from_env(**given: Any) -> HeadSettings:
    """HeadSettings from the options given (None: not given), partition/account/qos else from OFE_SLURM_*."""
    from ofe.cluster.launch import SLURM_ENV  # the training jobs' variables; launch is only needed here

    values = {k: v for k, v in given.items() if v is not None}
    for key in ("partition", "account", "qos"):
        if key not in values and os.environ.get(SLURM_ENV[key]):
            values[key] = os.environ[SLURM_ENV[key]]
    return HeadSettings(**values)


def _option_values(args: list[str], names: tuple[str, ...], many: bool) -> list[str]:
    """The values of a Snakemake option in `args` (`--opt a b`, `--opt=a`), in order."""
    found, i = [], 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name in names and eq:
            found.append(value)
        elif arg in names:
            i += 1
            while i < len(args) and not args[i].startswith("-"):
                found.append(args[i])
                i += 1
                if not many:
                    break
            continue
        i += 1
    return found


def results_dir(snakemake_args: list[str], cwd: Path) -> Path:
    """Where the workflow run by `snakemake_args` from `cwd` writes: the config's results_dir, as the
    Snakefile reads it (the --configfile files, merged in order, else config.yaml; `--config
    results_dir=...` over both), under --directory. A profile's own config entries are not read: give
    `ofe head --results` when a profile sets results_dir."""
    from ofe.plan.grid import load_config

    directory = _option_values(snakemake_args, ("--directory", "-d"), many=False)
    workdir = cwd / directory[-1] if directory else cwd
    files = [cwd / f for f in _option_values(snakemake_args, ("--configfile", "--configfiles"), many=True)]
    found = "results"
    for path in files or [workdir / "config.yaml"]:
        if path.exists():
            found = (load_config(path) or {}).get("results_dir", found)
    for item in _option_values(snakemake_args, ("--config", "-C"), many=True):
        key, _, value = item.partition("=")
        if key == "results_dir":
            found = value
    return workdir / found


def sbatch_script(settings: HeadSettings, snakemake_args: list[str], cwd: Path, log: Path,
                  bin_dir: Path | None = None) -> str:
    """The head job's batch script. `bin_dir` (the folder of the python running `ofe head`) goes first on
    PATH, so the job's Snakemake and its rules' `python -m ofe` are that environment's, as with `make run`."""
    settings.check()
    for what, path in (("the folder it runs in", cwd), ("its log", log)):
        if any(c.isspace() for c in str(path)):  # an #SBATCH line ends its value at the first blank
            raise HeadError(f"{what}, {str(path)!r}, holds a blank, which #SBATCH lines cannot carry; "
                            f"run `ofe head` from (and give --results) a path without one")
    q = shlex.quote
    lines = ["#!/bin/bash", f"#SBATCH --job-name={settings.job_name}", "#SBATCH --nodes=1", "#SBATCH --ntasks=1",
             f"#SBATCH --cpus-per-task={settings.cpus}", f"#SBATCH --mem={settings.mem_gb}G",
             f"#SBATCH --time={settings.time}", "#SBATCH --requeue", "#SBATCH --open-mode=append",
             f"#SBATCH --output={log}", f"#SBATCH --signal=B:USR1@{settings.requeue_before_s}",
             f"#SBATCH --chdir={cwd}"]
    lines += [f"#SBATCH --{key}={getattr(settings, key)}" for key in ("partition", "account", "qos")
              if getattr(settings, key)]
    args = shlex.join(snakemake_args)
    path = f'export PATH={q(str(bin_dir))}:"$PATH"\n' if bin_dir is not None else ""
    return "\n".join(lines) + f"""
# Written by `python -m ofe head` (ofe/cluster/head.py); SLURM keeps its own copy of what was submitted.
cd {q(str(cwd))} || exit 1
{path}say() {{ echo "[ofe head] $(date '+%Y-%m-%dT%H:%M:%S') $*"; }}
# USR1 comes {settings.requeue_before_s} s before the time limit: back to the queue rather than TIMEOUT. The
# restarted head re-attaches to the jobs in flight.
requeue() {{
    say "time limit near: requeueing head job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
}}
# scancel, a requeue or a preemption sends every process of the job SIGTERM, then SIGKILL. This shell must
# outlive Snakemake: an orphaned Snakemake can escape the SIGKILL (proctrack/linuxproc tracks descendants)
# and run on beside the restarted head.
stopping() {{ say "SIGTERM: snakemake stops; the jobs it waits on run on"; }}
trap requeue USR1
trap stopping TERM
say "head job $SLURM_JOB_ID (start $(( ${{SLURM_RESTART_COUNT:-0}} + 1 ))) on $(hostname) in $PWD: snakemake {args}"
# a head killed by scancel, preemption or the time limit leaves Snakemake's lock behind
snakemake --unlock {args} || exit $?
# in the background: bash runs a trap only once the foreground command ends, but interrupts `wait`
snakemake {args} &
pid=$!
say "snakemake runs as process $pid"
while true; do
    wait "$pid"
    status=$?
    kill -0 "$pid" 2>/dev/null || break  # still running: the wait was cut short by a trap
done
say "snakemake exited with status $status; \\`python -m ofe status\\` says where every run stands"
exit "$status"
"""


def read_record(results: Path) -> dict[str, Any] | None:
    """RESULTS/head.json, or None when no head was submitted for this results folder (or it is unreadable)."""
    try:
        info = json.loads((Path(results) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("job_id") else None


def refuse_live_head(results: Path, listing: Callable[[], dict[str, str]] = queue_listing) -> None:
    """HeadError while the head recorded in RESULTS/head.json is pending or running (one squeue), or when
    the scheduler cannot say: two heads on one folder would unlock each other's lock."""
    info = read_record(results)
    if info is None:
        return
    job_id, log = str(info["job_id"]), info.get("log", results / LOG)
    try:
        state = listing().get(job_id)
    except RuntimeError as e:
        raise HeadError(f"cannot tell whether head job {job_id} (in {results / RECORD}) is still queued: {e}; "
                        f"try again once squeue answers") from None
    if state in LIVE_STATES:
        raise HeadError(f"head job {job_id} is already {state.lower()}: see `python -m ofe status` and {log}; "
                        f"cancel it with scancel {job_id} first")


@contextlib.contextmanager
def _submit_lock(results: Path) -> Iterator[None]:
    """Two `ofe head` at once for one folder: the second waits, then finds the first's record."""
    results.mkdir(parents=True, exist_ok=True)
    with (results / ".head.lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def submit(settings: HeadSettings, snakemake_args: list[str], results: Path, cwd: Path, command: str,
           dry_run: bool = False) -> dict[str, Any]:
    """Write RESULTS/head.sbatch and submit it (refusing while a recorded head is live); returns the record
    written to RESULTS/head.json (with dry_run: the record it would write, job_id None, nothing submitted)."""
    results, cwd = Path(results).absolute(), Path(cwd).absolute()
    log, script = results / LOG, results / SCRIPT
    text = sbatch_script(settings, snakemake_args, cwd, log, Path(sys.executable).parent)
    record = {"job_id": None, "submitted": None, "command": command, "cwd": str(cwd),
              "snakemake": list(snakemake_args), "script": str(script), "log": str(log)}
    if dry_run:
        results.mkdir(parents=True, exist_ok=True)
        script.write_text(text)
        return record
    with _submit_lock(results):
        refuse_live_head(results)
        log.parent.mkdir(parents=True, exist_ok=True)  # SLURM does not create the log's folder
        script.write_text(text)
        try:
            out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise HeadError("sbatch was not found on PATH: run `python -m ofe head` on a SLURM login node") from None
        except subprocess.TimeoutExpired:
            raise HeadError(f"sbatch {script} did not answer in 120 s; check `squeue --me` before trying again "
                            f"(it may have been submitted)") from None
        if out.returncode:
            raise HeadError(f"sbatch {script} failed (exit {out.returncode}): {out.stderr.strip()[-1000:]}")
        job_id = out.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
        record.update(job_id=job_id, submitted=time.time())
        atomic_write_json(results / RECORD, record)
    return record


def describe(info: dict[str, Any], state: str) -> str:
    """The `ofe status` line of a recorded head job in `state` (UNKNOWN: the scheduler did not say)."""
    job_id, log = info["job_id"], info.get("log", "?")
    if state == "UNKNOWN":
        return f"head: SLURM job {job_id}, state unknown (SLURM not asked, or no answer); log: {log}"
    if is_live(state):
        return f"head: SLURM job {job_id} {state}; log: {log}"
    restart = info.get("command") or "python -m ofe head"
    where = f"cd {shlex.quote(info['cwd'])} && " if info.get("cwd") else ""
    return (f"head: SLURM job {job_id} is not running (it left the queue: {state}); jobs it submitted run on. "
            f"Restart it with: {where}{restart}  (log: {log})")


def main(args: Any) -> int:
    """`python -m ofe head` from its parsed arguments (ofe/__main__.py); the exit status."""
    cwd = Path.cwd()
    snakemake_args = list(args.snakemake) or list(DEFAULT_SNAKEMAKE_ARGS)
    settings = settings_from_env(job_name=args.job_name, time=args.time, cpus=args.cpus, mem_gb=args.mem_gb,
                                 requeue_before_s=args.requeue_before_s, partition=args.partition,
                                 account=args.account, qos=args.qos)
    results = args.results if args.results is not None else results_dir(snakemake_args, cwd)
    command = shlex.join([sys.executable, "-m", "ofe", *args.argv])
    try:
        record = submit(settings, snakemake_args, results, cwd, command, dry_run=args.dry_run)
    except HeadError as e:
        print(f"ofe head: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(Path(record["script"]).read_text(), end="")
        print(f"[ofe] dry run: wrote {record['script']}; nothing submitted")
        return 0
    print(f"[ofe] submitted head job {record['job_id']}: snakemake {shlex.join(snakemake_args)} from {cwd}\n"
          f"[ofe] log: {record['log']}; where things stand: python -m ofe status --results {results}\n"
          f"[ofe] stop it with scancel {record['job_id']} (its jobs run on); the same command restarts it and "
          f"re-attaches to them")
    return 0
