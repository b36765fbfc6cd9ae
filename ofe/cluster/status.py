"""`python -m ofe status`: where every run of the grid stands, from the run folders alone.

It needs no Snakemake head: it reads results/plan.json, each run folder (summary.json, quant.parquet,
error.txt, job.json and the tail of the job's log), the workflow's shared SLURM status cache, which the
waiting heads keep, and results/head.json, the head job `ofe head` submitted (`ofe.cluster.head`). When
that cache is fresher than `max_age_s` and knows every recorded job, the scheduler is not asked at all;
otherwise one batched squeue (and one sacct for jobs that left the queue) covers all recorded jobs, the
head job included, never one query per run. The answer is shown, not written to the cache: only the
waiting heads write it.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

from ofe.cluster.head import describe, read_record
from ofe.cluster.jobstate import StatusCache, is_live, pid_alive, query
from ofe.config import config_hash
from ofe.runfolder import INSPECT, JOB, METRICS, QUANT, SUMMARY, examine

STATUSES = ("done", "running", "pending", "failed", "diverged", "corrupt", "missing")
PROGRESS = re.compile(rb"\[ofe\] step (\d+)/(\d+) .*?max-kurtosis (\S+)")
TAIL_BYTES = 8192
QUANT_MISSING = f"{QUANT} missing (quantisation did not finish); rerun the workflow"


def _tail(path: Path, n: int = TAIL_BYTES) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(f.tell() - n, 0))
            return f.read()
    except OSError:
        return b""


def _progress(log: bytes) -> tuple[int | None, float | None]:
    """The last `[ofe] step N/M ... max-kurtosis K` line of a training log."""
    found = PROGRESS.findall(log)
    if not found:
        return None, None
    step, _, kurt = found[-1]
    try:
        value = float(kurt)
    except ValueError:
        value = math.nan
    return int(step), value


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def _live(row: dict[str, Any], info: dict[str, Any], slurm_states: dict[str, str]) -> str | None:
    """Set `row` to running/pending when the recorded job is still live; else return why it is not."""
    if not info:
        return "no job recorded"
    if info.get("cluster") == "slurm":
        state = slurm_states.get(str(info.get("job_id")), "UNKNOWN")
        row["detail"] = f"slurm {state}"
        if state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "CONFIGURING"):
            row["status"] = "pending"
        elif is_live(state):
            row["status"] = "running"
        else:
            return f"slurm {state}"
        return None
    if info.get("pid") and pid_alive(int(info["pid"]), info.get("pid_start")):
        row["status"] = "running"
        return None
    return "local job ended"


def _record(folder: Path) -> dict[str, Any]:
    """The folder's job.json ({} when there is none or it is unreadable)."""
    try:
        info = json.loads((folder / JOB).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def checkpoint_row(ckpt: dict[str, Any], folder: Path, slurm_states: dict[str, str]) -> dict[str, Any]:
    """One checkpoint of a checkpoint study: done once its inspect.json (written last) exists, failed
    with its error's last line, running or pending while its job lives, else missing."""
    row = {"run_id": f"checkpoints/{ckpt['ckpt_id']}", "status": "missing", "step": ckpt.get("step"),
           "steps": None, "max_kurtosis": None, "job": None, "detail": ""}
    info = _record(folder)
    row["job"] = info.get("job_id")
    if (folder / INSPECT).exists():
        try:
            done = json.loads((folder / INSPECT).read_text())
            row["max_kurtosis"], row["status"] = done["max_kurtosis"], "done"
            if (done["model"], done["revision"]) != (ckpt["model"], ckpt["revision"]):
                row["status"], row["detail"] = "corrupt", (f"{INSPECT}: measured {done['model']} at "
                                                           f"{done['revision']}, not the planned checkpoint")
        except (ValueError, KeyError, TypeError) as e:
            row["status"], row["detail"] = "corrupt", f"{INSPECT}: {e}"
    elif (error := examine(folder).error) is not None:
        row["status"], row["detail"] = "failed", error.strip()
    elif info and (why := _live(row, info, slurm_states)) is not None:
        row["status"], row["detail"] = "failed", f"{why} without {INSPECT}"
    return row


def run_row(run: dict[str, Any], run_dir: Path, slurm_states: dict[str, str]) -> dict[str, Any]:
    """One run's row: status, step/steps, latest max kurtosis, job id and, for failures, the last line.

    The run is complete (done or diverged) only once RUN/quant.parquet exists: the job writes
    metrics.parquet, then summary.json, then quant.parquet, so a summary alone means quantisation
    failed, is running (a quant-only rerun) or was cut short."""
    steps = run["config"]["train"]["steps"]
    row = {"run_id": run["run_id"], "status": "missing", "step": None, "steps": steps, "max_kurtosis": None,
           "job": None, "detail": ""}
    info = _record(run_dir)
    row["job"] = info.get("job_id")
    log = _tail(Path(info["stdout"])) if info.get("stdout") else b""
    row["step"], row["max_kurtosis"] = _progress(log)
    folder = examine(run_dir)  # the state from the files; a summary here is read as leniently as before
    if SUMMARY in folder.files:
        if folder.summary is None:
            row["status"], row["detail"] = "corrupt", folder.reason
            return row
        try:
            s = folder.summary
            finished = "done" if s["status"] == "completed" else s["status"]
            row["step"] = s.get("steps_done", row["step"])
            row["max_kurtosis"] = s.get("max_kurtosis_last", row["max_kurtosis"])
            if config_hash(s["config"]) != config_hash(run["config"]):
                row["status"], row["detail"] = "corrupt", f"{SUMMARY} belongs to another config"
                return row
        except (ValueError, KeyError, TypeError) as e:
            row["status"], row["detail"] = "corrupt", f"{SUMMARY}: {e}"
            return row
        if QUANT in folder.files:
            row["status"] = finished
            if METRICS not in folder.files:
                row["status"], row["detail"] = "corrupt", f"{METRICS} missing; rerun the workflow"
        elif folder.error is not None:
            row["status"], row["detail"] = "failed", folder.error.strip()
        elif _live(row, info, slurm_states) is not None:
            row["status"], row["detail"] = "corrupt", QUANT_MISSING
        return row
    if folder.error is not None:
        row["status"], row["detail"] = "failed", folder.error.strip()
        return row
    if not info:
        return row
    why = _live(row, info, slurm_states)
    if why is not None:  # ended without a summary: the head has not (yet) recorded the failure
        row["status"], row["detail"] = "failed", f"{why} without a summary; " + _last_line(
            log.decode(errors="replace"))
    return row


def slurm_states(results_dir: Path, job_ids: list[str], max_age_s: float, query_scheduler: bool) -> dict[str, str]:
    """The shared cache's states when it is fresher than `max_age_s` and knows every job, else those
    of one batched query (not written back)."""
    data = StatusCache(results_dir / ".ofe-status", max_age_s=max_age_s).read()
    # the whole queue listing of the last refresh is newer than states kept from earlier ones, and a job
    # it lacks has left the queue: a pending or running state kept for it is stale, so it is asked again
    queue = data.get("queue")
    states = {j: s for j, s in data.get("states", {}).items() if queue is None or j in queue or not is_live(s)}
    states.update(queue or {})
    missing = [j for j in job_ids if j not in states]
    if query_scheduler and job_ids and (time.time() - data.get("time", 0.0) > max_age_s or missing):
        try:
            states.update(query(job_ids))
        except RuntimeError as e:
            print(f"[ofe] SLURM query failed ({e}); showing the cached states", flush=True)
    return states


def grid_status(results_dir: Path | str, max_age_s: float = 60.0, query_scheduler: bool = True) -> list[dict]:
    """Every planned run's row, in plan order, then every checkpoint's (checkpoint studies)."""
    rows, _ = survey(results_dir, max_age_s, query_scheduler)
    if rows is None:
        raise FileNotFoundError(no_plan_message(Path(results_dir), head_submitted=False))
    return rows


def no_plan_message(results_dir: Path, head_submitted: bool) -> str:
    """Why there is no table yet, and what to run."""
    plan_path = results_dir / "plan.json"
    if head_submitted:  # the head job writes the plan once it starts
        return f"{plan_path} does not exist yet: the head job has not planned the grid (see its log)"
    return f"{plan_path} does not exist: run `snakemake -n` or `python -m ofe plan` first"


def survey(results_dir: Path | str, max_age_s: float = 60.0,
           query_scheduler: bool = True) -> tuple[list[dict] | None, str | None]:
    """(the rows of `grid_status`, None before the grid is planned; the head job's line, None when no
    `ofe head` was submitted for this folder). The head's state comes from the same one query."""
    results_dir = Path(results_dir)
    plan_path = results_dir / "plan.json"
    head = read_record(results_dir)
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else None
    runs = [(results_dir / "runs" / r["run_id"], r) for r in plan["runs"]] if plan else []
    ckpts = [(results_dir / "checkpoints" / c["ckpt_id"], c) for c in plan.get("checkpoints", [])] if plan else []
    slurm_ids = [str(head["job_id"])] if head else []
    for folder, done in [(f, QUANT) for f, _ in runs] + [(f, INSPECT) for f, _ in ckpts]:
        if (folder / JOB).exists() and not (folder / done).exists():  # complete ones need no query
            info = _record(folder)
            if info.get("cluster") == "slurm":
                slurm_ids.append(str(info["job_id"]))
    states = slurm_states(results_dir, slurm_ids, max_age_s, query_scheduler) if slurm_ids else {}
    line = describe(head, states.get(str(head["job_id"]), "UNKNOWN")) if head else None
    if plan is None:
        return None, line
    return ([run_row(run, folder, states) for folder, run in runs]
            + [checkpoint_row(c, folder, states) for folder, c in ckpts]), line


def format_table(rows: list[dict]) -> str:
    """A plain-text table and a count per status."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    header = ("run", "status", "step", "max kurt", "job", "detail")
    body = [(r["run_id"], r["status"], f"{cell(r['step'])}/{cell(r['steps'])}", cell(r["max_kurtosis"]), cell(r["job"]),
             r["detail"][:100]) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    ckpts = sum(r["run_id"].startswith("checkpoints/") for r in rows)
    what = f"{len(rows) - ckpts} runs" + (f" and {ckpts} checkpoints" if ckpts else "")
    lines.append(f"{what}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)
