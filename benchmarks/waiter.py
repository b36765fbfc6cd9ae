"""What one waiting train rule costs on the head: `python -m ofe launch` (issue 22, "a light waiter").

    .venv/bin/python benchmarks/waiter.py [--repeats 5]

Prints, for the code as it is:
- import: the wall time of a process that imports what `python -m ofe launch` imports (the CLI, the
  launcher, the job callables, the config), median of --repeats, and the bare interpreter's for reference;
  its peak RSS (VmHWM) and which heavy modules (torch, pandas, pyarrow, numpy) it left in sys.modules;
- waiting: the real `python -m ofe launch` waiting on a job. Two cases: re-attached to a recorded local
  job (here a `sleep`), read from /proc/<pid>/status while it waits; and a real submission through
  submitit's local executor (a run whose data is missing, so the job fails on its own after importing
  torch on its side), sampled until the waiter exits. VmRSS is the resident memory while waiting, VmHWM
  its peak; the heavy libraries are the shared objects mapped into the waiter (/proc/<pid>/maps), so
  that is exact, not a guess from timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "pandas", "pyarrow", "numpy")
ENTRY = "import ofe.__main__, ofe.cluster.launch, ofe.cluster.jobs, ofe.config"
PROBE = ("import sys, json; {imports}; "
         "s = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l); "
         "print(json.dumps({{'hwm_mb': int(s['VmHWM'].split()[0]) / 1024, "
         "'heavy': [m for m in {heavy!r} if m in sys.modules]}}))")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep)}


def _timed(code: str, repeats: int) -> tuple[float, dict]:
    times, out = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
        times.append(time.perf_counter() - start)
        out = json.loads(proc.stdout)
    return statistics.median(times), out


def _status(pid: int) -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def _heavy_mapped(pid: int) -> list[str]:
    """The heavy libraries whose files are mapped into `pid` (their compiled extensions or .so files)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return [m for m in HEAVY if f"/site-packages/{m}/" in maps or f"/site-packages/{m}." in maps]


def _sample(proc: subprocess.Popen, until: float) -> dict:
    """Sample the waiter until it exits or `until`: its last reading, and every heavy library it mapped."""
    last, heavy = {}, set()
    while proc.poll() is None and time.time() < until:
        try:
            reading, mapped = _status(proc.pid), _heavy_mapped(proc.pid)
        except (FileNotFoundError, ProcessLookupError, KeyError):
            break
        heavy |= set(mapped)
        last = reading
        time.sleep(0.05)
    return {**last, "heavy": sorted(heavy, key=HEAVY.index)}


def _launch_cmd(run_json: str, out: Path, status: Path) -> list[str]:
    return [sys.executable, "-m", "ofe", "launch", "--run-json", run_json,
            "--launcher-json", json.dumps({"cluster": "local", "poll_s": 0.5, "timeout_min": 5}),
            "--status-dir", str(status), "--out", str(out)]


def reattached(root: Path, run_json: str, wait_s: float) -> dict:
    """The waiter re-attached to a recorded local job (a `sleep`): it waits without submitting."""
    from ofe.cluster.jobstate import process_start_time

    out = root / "reattach"
    out.mkdir()
    job = subprocess.Popen(["sleep", "600"])
    try:
        (out / "job.json").write_text(json.dumps({"job_id": str(job.pid), "cluster": "local", "pid": job.pid,
                                                  "pid_start": process_start_time(job.pid),
                                                  "folder": str(out / "submitit"), "stdout": str(out / "log.out"),
                                                  "submitted": time.time()}))
        waiter = subprocess.Popen(_launch_cmd(run_json, out, root / "status"), env=_env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(wait_s)  # imported and in its wait loop by now
        result = {**_status(waiter.pid), "heavy": _heavy_mapped(waiter.pid), "alive": waiter.poll() is None}
        waiter.terminate()
        waiter.wait()
        return result
    finally:
        job.terminate()
        job.wait()


def submitted(root: Path, run_json: str, limit_s: float) -> dict:
    """The waiter of a real submission (submitit's local executor), sampled until it exits."""
    out = root / "submit"
    waiter = subprocess.Popen(_launch_cmd(run_json, out, root / "status"), env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = _sample(waiter, time.time() + limit_s)
    if waiter.poll() is None:
        waiter.terminate()
    waiter.wait()
    result["submitted"] = (out / "job.json").exists()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--wait-s", type=float, default=6.0, help="how long the re-attached waiter runs first")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from ofe.config import RunConfig, TrainConfig

    bare_s, bare = _timed(PROBE.format(imports="pass", heavy=HEAVY), args.repeats)
    sub_s, sub = _timed(PROBE.format(imports="import submitit", heavy=HEAVY), args.repeats)
    entry_s, entry = _timed(PROBE.format(imports=ENTRY, heavy=HEAVY), args.repeats)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"bare interpreter:        {bare_s:.3f} s, peak RSS {bare['hwm_mb']:.1f} MB")
    print(f"+ import submitit:       {sub_s:.3f} s, peak RSS {sub['hwm_mb']:.1f} MB, heavy: {sub['heavy'] or 'none'}")
    print(f"waiter's imports:        {entry_s:.3f} s (+{entry_s - bare_s:.3f} s over the bare interpreter), "
          f"peak RSS {entry['hwm_mb']:.1f} MB, heavy: {entry['heavy'] or 'none'}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = RunConfig(train=TrainConfig(steps=4, device="cpu", threads=1), data_dir=str(root / "no-data"))
        run_json = cfg.to_json()
        r = reattached(root, run_json, args.wait_s)
        print(f"waiting (re-attached):   VmRSS {r['VmRSS']:.1f} MB, VmHWM {r['VmHWM']:.1f} MB, "
              f"heavy mapped: {r['heavy'] or 'none'}" + ("" if r["alive"] else "  (it had exited!)"))
        s = submitted(root, run_json, 120.0)
        print(f"waiting (submitted):     VmRSS {s.get('VmRSS', 0):.1f} MB, VmHWM {s.get('VmHWM', 0):.1f} MB, "
              f"heavy mapped: {s['heavy'] or 'none'}" + ("" if s["submitted"] else "  (nothing was submitted!)"))


if __name__ == "__main__":
    main()
