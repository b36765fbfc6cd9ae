"""Snakemake plan time (dry run) for a ~10,000-run grid. Prints figures; target 10 s or less.

    .venv/bin/python benchmarks/plan.py

The grid: 7 blocks x 5 betas x 4 optimisers x 6 learning rates x 2 scales x 6 seeds = 10,080 runs,
i.e. 10,080 jobs (each trains and quantises one run) in the DAG. Runs three times: the spread is about
half a second on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from ofe.plan import grid

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["studies"] = {"big": {"grid": {
        "block": ["pre_ln", "post_ln", "pre_rms", "pre_srms", "no_norm", "op", "op_final_norm"],
        "beta": [0.1, 0.2, 0.5, 1.0, 2.0],
        "optimizer": ["adamw", "soap", "adafactor", "rotated_adafactor"],
        "lr": [1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2, 3.0e-2],
        "scale": ["tiny", "small"],
        "seed": [0, 1, 2, 3, 4, 5],
    }}}
    work = Path(tempfile.mkdtemp(prefix="ofe-plan-"))
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    t0 = time.perf_counter()
    runs = grid.expand(config, REPO / "workflow" / "schemas" / "config.schema.yaml")
    t_expand = time.perf_counter() - t0
    snakemake = shutil.which("snakemake") or str(Path(sys.executable).parent / "snakemake")
    times = []
    for _ in range(3):
        shutil.rmtree(work / ".snakemake", ignore_errors=True)
        t0 = time.perf_counter()
        out = subprocess.run([snakemake, "-s", str(REPO / "Snakefile"), "--directory", str(work),
                              "--profile", str(REPO / "profiles" / "local"), "-n", "--quiet"],
                             capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        times.append(time.perf_counter() - t0)
        if out.returncode:
            sys.exit(out.stderr[-2000:])
    print(f"{len(runs):,} runs: validate + expand {t_expand:.2f} s; `snakemake -n` (parse, plan, DAG of "
          f"{len(runs):,} jobs) {min(times):.1f} s best, {max(times):.1f} s worst of 3 (target <= 10 s)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
