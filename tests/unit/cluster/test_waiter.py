"""The light waiter (issue 22): what waits on the head for a job, one `python -m ofe launch` per run in
flight, imports neither torch, pandas nor pyarrow. Exact, in a fresh interpreter: its sys.modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import REPO

HEAVY = ("torch", "pandas", "pyarrow")

# The CLI's launch path (both subcommands' imports), pickling the jobs' callables as submitit does on
# submission, and a re-attached waiter waiting on a recorded local job until it ends.
WAITER = """
import json, subprocess, sys, time
from pathlib import Path

import ofe.__main__
from ofe.cluster.launch import launch, launch_inspect
from ofe.config import RunConfig, TrainConfig
from ofe.plan.studies import inspect_settings
from ofe.cluster.jobs import InspectJob, LocalGpus, TrainJob
from ofe.cluster.pack import PackJob
import ofe.cluster.dispatch, ofe.cluster.handover  # the SLURM dispatcher and the waiter's side of it
from ofe.cluster.jobstate import process_start_time
from submitit.core.utils import DelayedSubmission

root = Path(sys.argv[1])
DelayedSubmission(LocalGpus(TrainJob(), None, None), "config.json", str(root), {}).dump(root / "train.pkl")
DelayedSubmission(InspectJob(), {"ckpt_id": "m/1"}, str(root), {}, {}, {}).dump(root / "inspect.pkl")
DelayedSubmission(PackJob(), [{"out": str(root), "config": "config.json", "quant": {}}]).dump(root / "pack.pkl")
try:
    ofe.__main__.main(["launch", "--help"])
except SystemExit:
    pass
out = root / "run"
out.mkdir()
job = subprocess.Popen(["sleep", "0.5"])
(out / "job.json").write_text(json.dumps({"job_id": str(job.pid), "cluster": "local", "pid": job.pid,
                                          "pid_start": process_start_time(job.pid), "folder": str(out / "s"),
                                          "stdout": str(out / "log.out"), "submitted": time.time()}))
try:
    launch(RunConfig(train=TrainConfig(steps=1)), out, {"cluster": "local", "poll_s": 0.1}, root / "status")
    waited = "returned"
except RuntimeError as e:
    waited = str(e)
job.wait()
print(json.dumps({"waited": "ended without summary.json" in waited,
                  "loaded": sorted(m for m in %r if m in sys.modules)}))
"""


def test_the_waiter_imports_no_torch_pandas_or_pyarrow(tmp_path) -> None:
    res = subprocess.run([sys.executable, "-c", WAITER % (HEAVY,), str(tmp_path)], capture_output=True, text=True,
                         cwd=REPO, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"waited": True, "loaded": []}


def test_the_schemas_are_built_on_first_use() -> None:
    """ofe.io's Parquet schemas stay what they were, from its light field lists."""
    import pyarrow as pa

    import ofe.io as io

    assert io.METRIC_SCHEMA == pa.schema([("step", pa.int64()), ("tokens", pa.int64()), ("layer", pa.int64()),
                                          ("site", pa.string()), ("metric", pa.string()), ("value", pa.float64())])
    assert io.QUANT_SCHEMA == pa.schema([("protocol", pa.string()), ("bits", pa.int64()), ("ppl_fp", pa.float64()),
                                         ("ppl_q", pa.float64()), ("delta", pa.float64())])
    assert io.QUANT_COLUMNS == io.QUANT_SCHEMA.names and io.METRIC_SCHEMA is io.METRIC_SCHEMA
