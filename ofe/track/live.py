"""What a job calls: the trainer's tracker (`for_run`), and the int8 rows after quantisation (`log_quant`).

The settings come from the run folder (RUN/tracking-settings.json, written by `ofe launch` from the
workflow's `tracking:` section; `ofe.plan.tracking` says why there and not in the run's config). Without
them, or with backend none, or on a rank other than 0, the trainer gets `OFF`, whose methods do nothing:
no tracker library is imported and no thread started.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ofe.runfolder import read_tracking, read_tracking_settings
from ofe.track.backends import RunMeta
from ofe.track.tracker import FLUSH_TIMEOUT_S, Tracker, find_entry, warn
from ofe.track import names


def run_meta(out: Path | str, config: dict[str, Any]) -> RunMeta:
    """A run's name (its run id), group (the run id without its seed), parameters (its whole config,
    flattened; the grid labels and the token cache's path, which are not what training reads, left out)
    and tags (its grid values)."""
    name = names.run_name(out)
    # as config.json and summary.json hold it (tuples as lists), so a live run and an export read the same
    config = json.loads(json.dumps(config, default=str))
    params = names.flatten({k: v for k, v in config.items() if k not in ("grid", "data_dir")})
    return RunMeta(name, names.seed_group(name), params, names.grid_tags(config.get("grid") or {}))


class RunTracker:
    """The trainer's side of a `Tracker`: hands it the metric rows added since the last call."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker, self.sent = tracker, 0

    def rows(self, rows: list[tuple]) -> None:
        """Queue the rows appended to `rows` (the run's list, `RunState.rows`) since the last call: after
        each step, every row of that step and before (a slice and a queue append: microseconds)."""
        if len(rows) > self.sent:
            self.tracker.rows(rows[self.sent:])
            self.sent = len(rows)

    def finish(self, rows: list[tuple], summary: dict[str, Any]) -> None:
        """The last rows and the summary; the tracker run is then ended (waiting at most FLUSH_TIMEOUT_S)."""
        self.rows(rows)
        self.tracker.summary(summary)
        self.tracker.close(ok=True)

    def close(self) -> None:
        """End it after a failure of the run (a no-op after `finish`)."""
        self.tracker.close(ok=False, timeout=min(FLUSH_TIMEOUT_S, 30.0))


class Off:
    """Tracking off: the same methods, doing nothing."""

    def rows(self, rows: list[tuple]) -> None:
        pass

    def finish(self, rows: list[tuple], summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


OFF = Off()


def for_run(out: Path | str, config: dict[str, Any], identity: str, rank: int) -> RunTracker | Off:
    """The tracker of the run trained into `out` (config as a dict, `identity` its run identity): rank 0
    of a run whose folder holds tracking settings, else OFF."""
    settings = read_tracking_settings(Path(out))
    if rank or settings["backend"] == "none":
        return OFF
    return RunTracker(Tracker(out, settings, identity, run_meta(out, config)))


def log_quant(run_dir: Path | str, summary: dict[str, Any], rows: list[tuple]) -> None:
    """quant.parquet's rows to the tracker run the training logged to (resumed by its id). A run trained
    untracked gets none here (a tracker run of int8 rows alone would be misleading): `ofe export` mirrors
    it whole. Waits for the tracker at most FLUSH_TIMEOUT_S: the job's work is done."""
    run_dir = Path(run_dir)
    settings = read_tracking_settings(run_dir)
    if settings["backend"] == "none":
        return
    if find_entry(read_tracking(run_dir), settings) is None:
        warn(f"{run_dir} has no {settings['backend']} run in its tracking.json; its int8 rows are not "
             "tracked (python -m ofe export mirrors the whole run)")
        return
    tracker = Tracker(run_dir, settings, summary.get("config_hash"), run_meta(run_dir, summary.get("config") or {}))
    tracker.quant(rows)
    tracker.close(ok=True)
