"""Real int8 kernels against the simulation on a finished study's runs. Prints figures.

    .venv/bin/python benchmarks/int8_agreement.py results/attention [--eval-batches 8]

For every completed run under RESULTS/runs: full-precision perplexity, the simulated `dynamic_per_token`
W8A8 with absmax weight ranges (the recipe torchao runs) and `torchao_dynamic` (torchao's int8 x int8 ->
int32 matmuls), each measured by the pipeline's own `quantise_run` on a scratch copy of the run folder (the
run's own quant.parquet is untouched), and |torchao - simulated| as a share of the simulated damage
|simulated - fp32|, which tests/unit/core/test_torchao_agreement.py bounds by 0.2 on planted-outlier runs.
A share is meaningless where the damage itself is within rounding of zero: those rows say so.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ofe.config import QuantConfig
from ofe.runfolder import CHECKPOINT
from ofe.train.quantise import quantise_run

# Below this damage (perplexity), the share is a ratio of two rounding-level numbers: not reported. The
# absolute gap |torchao - simulated| is printed for every run.
NOISE_PPL = 1e-2


def completed_runs(results: Path) -> list[Path]:
    out = []
    for summary in sorted((results / "runs").rglob("summary.json")):
        if json.loads(summary.read_text()).get("status") == "completed":
            out.append(summary.parent)
    return out


def measure(run: Path, cfg: QuantConfig) -> dict[str, float]:
    """fp32, simulated and torchao perplexities of `run`, measured in a scratch folder that links its files."""
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for name in ("summary.json", "config.json", CHECKPOINT):
            (scratch / name).symlink_to((run / name).resolve())
        df = quantise_run(scratch, cfg)
    by = {row.protocol: row for row in df.itertuples()}
    return {"fp": by["dynamic_per_token"].ppl_fp, "sim": by["dynamic_per_token"].ppl_q,
            "torchao": by["torchao_dynamic"].ppl_q}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, help="a study's results folder (with runs/)")
    ap.add_argument("--eval-batches", type=int, default=8)
    args = ap.parse_args()
    cfg = QuantConfig(protocols=("dynamic_per_token", "torchao_dynamic"), bits=(8,), weight_range="absmax",
                      eval_batches=args.eval_batches)
    runs = completed_runs(args.results)
    print(f"{len(runs)} completed runs in {args.results}; W8A8, absmax weights, {args.eval_batches} eval batches")
    print(f"{'run':70s} {'fp32':>8s} {'sim':>8s} {'torchao':>8s} {'|gap|':>7s} {'share':>7s}")
    shares, gaps, t0 = [], [], time.perf_counter()
    for run in runs:
        r = measure(run, cfg)
        damage = abs(r["sim"] - r["fp"])
        gap = abs(r["torchao"] - r["sim"])
        gaps.append(gap / r["fp"])
        share = gap / damage if damage > NOISE_PPL else float("nan")
        if damage > NOISE_PPL:
            shares.append(share)
        name = str(run.relative_to(args.results / "runs"))
        shown = f"{share:7.3f}" if damage > NOISE_PPL else "      -"
        print(f"{name:70s} {r['fp']:8.3f} {r['sim']:8.3f} {r['torchao']:8.3f} {gap:7.4f} {shown}", flush=True)
    wall = time.perf_counter() - t0
    if gaps:
        print(f"|torchao - simulated| / fp32 ppl: max {max(gaps):.2e} over {len(gaps)} runs")
    if shares:
        print(f"share over {len(shares)} runs with damage > {NOISE_PPL}: max {max(shares):.3f}, "
              f"median {sorted(shares)[len(shares) // 2]:.3f}")
    print(f"{wall:.1f} s for {len(runs)} runs")


if __name__ == "__main__":
    main()
