"""`python -m ofe status` over 1,000 runs. Prints figures; target under 2 s.

    .venv/bin/python benchmarks/status.py [--runs 1000]

The synthetic grid mixes finished runs (summary.json, metrics.parquet, quant.parquet), failed runs
(error.txt), running local jobs (a job.json for this very process and a job log with progress lines)
and runs not started, in equal parts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ofe.cluster.jobstate import process_start_time
from ofe.config import RunConfig

REPO = Path(__file__).resolve().parents[1]


def make_grid(root: Path, n: int) -> None:
    config = RunConfig().to_dict()
    runs = []
    for i in range(n):
        run_id = f"tiny/pre_ln/beta1/adamw/lr0.01/seed{i}"
        runs.append({"run_id": run_id, "grid": {}, "studies": ["s"], "config": config})
        out = root / "runs" / run_id
        out.mkdir(parents=True)
        kind = i % 4
        if kind == 0:
            (out / "summary.json").write_text(json.dumps({"status": "completed", "steps_done": 400, "config": config,
                                                          "max_kurtosis_last": 5.0}))
            for name in ("metrics.parquet", "quant.parquet"):  # status reads only their presence
                (out / name).write_bytes(b"PAR1")
        elif kind == 1:
            (out / "error.txt").write_text("Traceback ...\nRuntimeError: out of memory\n")
        elif kind == 2:
            log = out / "job.out"
            log.write_text("".join(f"[ofe] step {s}/400 loss 3.0 lr 1e-2 max-kurtosis 4.2 9,000 tok/s\n"
                                   for s in range(25, 401, 25)))
            (out / "job.json").write_text(json.dumps({
                "job_id": str(i), "cluster": "local", "pid": os.getpid(),
                "pid_start": process_start_time(os.getpid()), "stdout": str(log), "folder": str(out)}))
    (root / "plan.json").write_text(json.dumps({"runs": runs}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=1000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ofe-status-"))
    try:
        make_grid(root / "results", args.runs)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "ofe", "status", "--results", str(root / "results")],
                                 cwd=REPO, capture_output=True, text=True, check=True)
            times.append(time.perf_counter() - t0)
        print(out.stdout.splitlines()[-1])
        print(f"`python -m ofe status` over {args.runs:,} runs: {min(times):.2f} s best, {max(times):.2f} s worst "
              f"of 3 (whole command, interpreter start included; target < 2 s)")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
