"""Aggregation time for the Parquet of 1,000 runs. Prints figures; target 5 s or less.

    .venv/bin/python benchmarks/aggregate.py [--runs 1000]

Each synthetic run has the metric rows of a default `tiny` run (400 steps, logged every 25: 17 probes x
4 layers + 2 unembedding sites x 5 metrics, attention entropy, 400 x 3 train rows, val rows) and a
quant.parquet of 2 protocols x 3 bit widths.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ofe.aggregate.runs import aggregate
from ofe.core.metrics import STREAM_METRICS
from ofe.io import METRIC_SCHEMA, write_parquet
from ofe.io import QUANT_SCHEMA


def synthetic_metrics(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for step in range(0, 401, 25):
        for layer, site in [(i, "block_input") for i in range(4)] + [(4, "unembed_input_pre_norm"), (4, "unembed_input")]:
            rows += [(step, step * 2048, layer, site, m, float(rng.random() * 5 + 1)) for m in STREAM_METRICS]
        rows += [(step, step * 2048, i, "attention", "attention_entropy", float(rng.random())) for i in range(4)]
    for step in range(400):
        rows += [(step, step * 2048, -1, "train", m, float(rng.random())) for m in ("loss", "lr", "grad_norm")]
    rows += [(s, s * 2048, -1, "val", "loss", 2.0) for s in (0, 200, 400)]
    return pd.DataFrame(rows, columns=METRIC_SCHEMA.names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=1000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ofe-agg-"))
    rng = np.random.default_rng(0)
    template = synthetic_metrics(rng)
    quant = pd.DataFrame([(p, b, 10.0, 11.0, 1.0) for p in ("static_per_tensor", "dynamic_per_token")
                          for b in (8, 6, 4)], columns=QUANT_SCHEMA.names)
    plan_runs = []
    for i in range(args.runs):
        run_id = f"tiny/pre_ln/beta1/adamw/lr0.01/seed{i}"
        d = work / "runs" / run_id
        write_parquet(template, d / "metrics.parquet", METRIC_SCHEMA)
        write_parquet(quant, d / "quant.parquet", QUANT_SCHEMA)
        (d / "summary.json").write_text(json.dumps({"status": "completed", "final_val_loss": 2.0,
                                                    "steps_done": 400, "wall_s": 80.0, "tokens_per_s": 1e4}))
        plan_runs.append({"run_id": run_id, "studies": ["s"], "grid": {
            "scale": "tiny", "block": "pre_ln", "beta": 1.0, "optimizer": "adamw", "lr": 0.01, "seed": i}})
    plan = {"runs": plan_runs, "grid_columns": ["scale", "block", "beta", "optimizer", "lr", "seed"],
            "studies": [{"name": "s", "title": "s", "question": "", "axes": ["seed"]}], "config": {}}
    t0 = time.perf_counter()
    frames = aggregate(plan, work)
    dt = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in work.glob("*.parquet")) / 1e6
    print(f"{args.runs:,} runs, {len(frames['metrics']):,} metric rows ({len(template):,} per run): "
          f"aggregate {dt:.2f} s (target <= 5 s); tables {size:.1f} MB")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
