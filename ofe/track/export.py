"""`python -m ofe export --to wandb|mlflow`: finished runs mirrored after the fact, from their files.

Each run folder is read as the aggregation reads it (`ofe.runfolder.examine` for its state,
`ofe.aggregate.read.read_table` for metrics.parquet and quant.parquet, checked against the config its
summary records) and sent through the same `Tracker` a live run uses, so a run exported and a run tracked
live look the same in the tracker. A run not finished (missing, failed, corrupt) is skipped, with its
state.

Idempotent: tracking.json keeps, per destination, the tracker run's id and how far it got. A run whose
tracker run already holds everything (metrics, summary and, if the run has them, int8 rows) is skipped,
naming that id; one half done (a live tracker that stopped, an export interrupted) is resumed under the same
id and completed, sending only the steps after the last one it holds. To export a run again from scratch,
delete its entry in tracking.json (or the file).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ofe.config import config_hash
from ofe.runfolder import CONFIG, METRICS, QUANT, STALE, SUMMARY, examine, read_json, read_tracking, recorded_hash
from ofe.track.live import run_meta
from ofe.track.tracker import Tracker, find_entry


def run_folders(results: Path) -> list[Path]:
    """The run folders of a results folder: the plan's runs (RESULTS/plan.json), else every folder under
    RESULTS/runs holding a config or a summary (never a `stale/` copy)."""
    plan = read_json(results / "plan.json")
    if isinstance(plan, dict) and isinstance(plan.get("runs"), list):
        return [results / "runs" / r["run_id"] for r in plan["runs"]]
    runs = results / "runs"
    found = {p.parent for name in (CONFIG, SUMMARY) for p in runs.rglob(name)
             if STALE not in p.relative_to(runs).parts}
    return sorted(found)


def _rows(path: Path, schema_name: str, want: str | None) -> list[tuple]:
    """A run's Parquet table, checked as the aggregation checks it, as row tuples in its schema's order."""
    import ofe.io
    from ofe.aggregate.read import read_table

    table = read_table(path, getattr(ofe.io, schema_name), want)
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
    return list(zip(*columns))


def export_run(folder: Path, settings: dict[str, Any]) -> tuple[str, str]:
    """Mirror one run folder; returns (outcome, what to print): outcome is exported, skipped, done or failed."""
    state = examine(folder)
    summary = state.finished
    if summary is None:
        why = f": {state.reason}" if state.reason else (f": {state.error}" if state.error else "")
        return "skipped", f"not finished ({state.state}{why}); skipped"
    identity = recorded_hash(summary)
    record = read_tracking(folder)
    entry = find_entry(record, settings) if record.get("config_hash") in (None, identity) else None
    has_quant = QUANT in state.files
    if entry and entry.get("summary") and (entry.get("quant") or not has_quant):
        return "done", f"already in {settings['backend']} as run {entry['run_id']} (tracking.json); skipped"
    config = summary.get("config") or {}
    want = config_hash(config) if config else None
    from ofe.aggregate.read import CorruptRun

    try:
        metrics = _rows(folder / METRICS, "METRIC_SCHEMA", want)
        quant = _rows(folder / QUANT, "QUANT_SCHEMA", want) if has_quant else []
    except CorruptRun as e:
        return "skipped", f"corrupt ({e}); skipped"
    tracker = Tracker(folder, settings, identity, run_meta(folder, config))
    tracker.rows(metrics)
    tracker.summary(summary)
    if quant:
        tracker.quant(quant)
    if not tracker.close(ok=True) or tracker.run_id is None:
        return "failed", "not exported (see the warning above)"
    verb = "completed" if entry else "exported"
    return "exported", (f"{verb} as {settings['backend']} run {tracker.run_id}: {tracker.logged} steps"
                        + (f", {len(quant)} int8 rows" if quant else ""))


def export(results: Path, settings: dict[str, Any]) -> dict[str, int]:
    """Every run folder of `results` to the tracker `settings` name, with a progress line each; returns the
    count of each outcome."""
    folders = run_folders(results)
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    print(f"[ofe] export: {len(folders)} runs of {results} to {settings['backend']} "
          f"(project {settings['project']})", flush=True)
    for i, folder in enumerate(folders, 1):
        outcome, line = export_run(folder, settings)
        counts[outcome] = counts.get(outcome, 0) + 1
        shown = folder.relative_to(results / "runs") if folder.is_relative_to(results / "runs") else folder
        print(f"[ofe] export {i}/{len(folders)} {shown}: {line}", flush=True)
    print(f"[ofe] export: {counts} in {time.perf_counter() - t0:.1f} s", flush=True)
    return counts


def main(args: argparse.Namespace) -> int:
    """The CLI: settings from --config's `tracking:` (where it names this backend) updated by the options."""
    from ofe.plan.grid import load_config, validate
    from ofe.plan.tracking import check_settings

    given: dict[str, Any] = {}
    if args.config is not None:
        config = validate(load_config(args.config))
        results = Path(config.get("results_dir", "results"))
        tracking = config.get("tracking") or {}
        if tracking.get("backend") == args.to:
            given = {k: v for k, v in tracking.items() if k != "backend"}
    else:
        results = args.results or Path("results")
    for key in ("project", "mode", "tracking_uri"):
        if getattr(args, key) is not None:
            given[key] = getattr(args, key)
    settings = check_settings({"backend": args.to, **given}, results)
    if not (results / "runs").is_dir():
        print(f"ofe export: {results / 'runs'} does not exist: no runs to export", flush=True)
        return 1
    counts = export(results, settings)
    return 1 if counts.get("failed") else 0
