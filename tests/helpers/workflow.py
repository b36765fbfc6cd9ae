"""The workflow tests' Snakemake: the command (local profile) on a work folder, a tiny grid's config, and
the job counts of a plan."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

SNAKEMAKE = shutil.which("snakemake") or str(Path(sys.executable).parent / "snakemake")

TEST_CONFIG = {
    "data": {"source": "stdlib", "max_documents": 150},
    "launcher": {"cluster": "local", "poll_s": 0.5, "timeout_min": 10},
    "quant": {"bits": [8, 4], "calib_batches": 2, "eval_batches": 2},
    "defaults": {
        "block": "pre_ln", "scale": "tiny", "optimizer": "adamw", "lr": 1.0e-2, "seed": 0,
        "model": {"n_layer": 2, "d_model": 32, "n_head": 2, "context": 32},
        "train": {"steps": 20, "batch_size": 4, "log_every": 5, "eval_every": 10, "checkpoint_every": 10},
    },
    "studies": {
        "norms": {"title": "Norms", "question": "OP vs Pre-LN?", "grid": {"block": ["pre_ln", "op"]}},
        "seeds": {"grid": {"block": ["op"], "seed": [0]}},  # shares its only run with `norms`
    },
}


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--profile", str(REPO / "profiles" / "local"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, timeout=600)


def job_counts(output: str) -> dict[str, int]:
    stats = output.split("Job stats:")[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", stats, re.M)}
