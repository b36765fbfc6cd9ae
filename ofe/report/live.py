"""`ofe report --live`: the partial report of a sweep in progress, from any shell, at any moment.

Aggregates the runs finished so far into RESULTS/partial/ (never the workflow's own tables in RESULTS/,
never .snakemake/, never a run folder's lock: reading run folders is all `ofe.aggregate` does) and
builds the report with its partial-results banner. A run still training (only checkpoints, job.json,
logs) is `missing` there, like a run not started. The page goes to REPORT's `-partial` sibling
(reports/index-partial.html) unless `out` is given, so the last complete report stays readable while
the grid runs; RESULTS/report.json, the workflow's completion mark, is never written. The workflow's
`onerror` calls the same function with `out=REPORT`.
"""

from __future__ import annotations

import json
from pathlib import Path


class NoPlan(Exception):
    """No plan.json yet: the message says what to run first."""


def settings(config: Path | None) -> tuple[Path, Path]:
    """(RESULTS, REPORT) as the workflow reads them from a config file (config.yaml by default)."""
    from ofe.plan.grid import load_config

    path = config or Path("config.yaml")
    cfg = (load_config(path) or {}) if path.exists() else {}
    return Path(cfg.get("results_dir", "results")), Path(cfg.get("report", "reports/index.html"))


def partial_path(report: Path) -> Path:
    """reports/index.html -> reports/index-partial.html."""
    return report.with_name(f"{report.stem}-partial{report.suffix}")


def live_report(results: Path, plan_path: Path | None = None, out: Path | None = None,
                report: Path = Path("reports/index.html"), png: bool = True) -> tuple[Path, dict]:
    """Aggregate RESULTS' run folders into RESULTS/partial and build the partial report; returns the
    page and the runs' status counts. Raises NoPlan before the workflow has planned the grid."""
    from ofe.aggregate.runs import aggregate
    from ofe.plan.grid import default_figures_dir
    from ofe.report.page import build_report

    plan_path = plan_path or results / "plan.json"
    if not plan_path.exists():
        raise NoPlan(f"no plan at {plan_path}: start the sweep first (`make run`, or `snakemake --profile "
                     "...`; it writes the plan before any run), or pass --plan / --config for another grid")
    plan = json.loads(plan_path.read_text())
    partial = results / "partial"
    frames = aggregate(plan, results, partial)
    out = out or partial_path(report)
    page = build_report(partial, out, figures_dir=default_figures_dir(out), runs_dir=results / "runs", png=png)
    return page, frames["runs"].status.value_counts().to_dict()
