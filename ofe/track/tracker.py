"""One run's mirror to a tracker: a backend (`ofe.track.backends`) driven by a background thread.

Why a thread and a bounded queue: a tracker can be slow (wandb starts a service process, an MLflow
server can stall, a network mount can hang) and training must not wait for it. The training thread only
appends to a queue (`put_nowait`: microseconds); the thread imports the library, starts or resumes the
tracker run and logs. If the queue is full (the tracker far behind), the item is dropped, counted and
reported in the run's log: never a blocked step. Only `close`, after the run's work, waits, and then at
most `timeout` seconds, for the queue to drain.

Any failure (the library missing, init, a log call) is one warning line in the run's log; tracking then
stops for this run, which goes on and finishes as it would untracked.

Resume. The tracker run's id is in RUN/tracking.json (`ofe.runfolder.read_tracking`), one entry per
destination (backend, project, and the MLflow URI), written atomically as soon as the run is started, so a
requeued or resumed job continues the same tracker run. The entry also keeps the last step logged
(written every `SAVE_EVERY_S` and at the end); a resumed tracker logs only steps after the larger of that
and what the backend itself holds (MLflow's history; W&B online), so no step is sent twice where the
backend could tell, and none is lost: the rows restored from the checkpoint are offered again.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

from ofe.runfolder import read_tracking, write_tracking
from ofe.track import backends, names
from ofe.track.backends import RunMeta

QUEUE_SIZE = 10_000  # items (one per training step): far more than a tracker falls behind unless it hangs
FLUSH_TIMEOUT_S = 120.0  # what close() waits at most for the queue to drain and the run to end
SAVE_EVERY_S = 30.0  # how often the last step logged is written to tracking.json while logging
_END = object()


def destination(settings: dict[str, Any]) -> dict[str, str]:
    """Which tracker run an entry of tracking.json is: backend, project and, for MLflow, the URI (W&B's
    offline and online runs are one run: `wandb sync` uploads the offline one under its id)."""
    where = {"backend": settings["backend"], "project": settings["project"]}
    if settings["backend"] == "mlflow":
        where["tracking_uri"] = settings["tracking_uri"]
    return where


def find_entry(record: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any] | None:
    where = destination(settings)
    return next((e for e in record.get("runs", []) if all(e.get(k) == v for k, v in where.items())), None)


def warn(what: str, e: BaseException | None = None) -> None:
    detail = f": {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}" if e else ""
    print(f"[ofe] tracking: warning: {what}{detail}", flush=True)


class Tracker:
    """The mirror of the run in `run_dir` (identity `identity`, its config hash) to the tracker `settings`
    name. `rows`, `summary` and `quant` only queue; `close` ends it."""

    def __init__(self, run_dir: Path | str, settings: dict[str, Any], identity: str | None, meta: RunMeta,
                 queue_size: int = QUEUE_SIZE) -> None:
        self.run_dir, self.settings, self.identity, self.meta = Path(run_dir), settings, identity, meta
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.dropped = self.logged = 0
        self.failed = self.closed = False
        self.run_id: str | None = None
        self.logged_step = -1
        self._saved_at = time.monotonic()
        self._thread = threading.Thread(target=self._work, name="ofe-tracker", daemon=True)
        self._thread.start()

    # ---- the training thread's side: never blocks ---------------------------------------------------
    def rows(self, rows: list[tuple]) -> None:
        """Metric rows (step, tokens, layer, site, metric, value) to log, each step's rows together."""
        self._put(("rows", rows))

    def summary(self, summary: dict[str, Any]) -> None:
        self._put(("summary", summary))

    def quant(self, rows: list[tuple]) -> None:
        """quant.parquet's rows (protocol, bits, ppl_fp, ppl_q, delta)."""
        self._put(("quant", rows))

    def _put(self, item: tuple) -> None:
        if self.failed or self.closed:
            return
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                warn(f"the tracker is {self.queue.maxsize} steps behind; steps are dropped (counted, "
                     "reported at the end) rather than slow training down")

    def close(self, ok: bool = True, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """End the tracker run after what is queued (ok: the run did not fail), waiting at most `timeout`
        seconds; returns whether everything queued reached the tracker. Idempotent."""
        if self.closed:
            return not self.failed and not self.dropped
        self.closed = True
        deadline = time.monotonic() + timeout
        try:  # at the end of the run: waiting here costs no training step
            self.queue.put((_END, ok), timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        hung = self._thread.is_alive()  # a daemon thread: it cannot keep the process alive
        if hung:
            warn(f"the tracker did not finish within {timeout:g} s; {self.queue.qsize()} queued item(s) "
                 "not sent (the run's own files are complete)")
        if self.dropped:
            warn(f"{self.dropped} step(s) were dropped while the tracker was behind; `python -m ofe export` "
                 "cannot fill them in (it skips steps the tracker run holds): delete the run's tracking.json "
                 "entry and export again for a complete copy")
        return not (hung or self.failed or self.dropped)

    # ---- the thread -------------------------------------------------------------------------------
    def _work(self) -> None:
        backend = None
        try:
            backend = self._open()
        except BaseException as e:  # noqa: BLE001 - an import error is as much a warning as a refused init
            self._fail(f"could not start a {self.settings['backend']} run", e)
        while True:
            item = self.queue.get()
            if item[0] is _END:
                if backend is not None and not self.failed:
                    try:
                        backend.close(item[1])
                    except Exception as e:  # noqa: BLE001
                        self._fail("ending the tracker run failed", e)
                    self._save(force=True)
                return
            if self.failed:
                continue  # drain: nothing more is sent, and close() still returns at once
            try:
                self._handle(backend, item)
            except Exception as e:  # noqa: BLE001 - a tracker's failure is never the run's
                self._fail(f"logging to {self.settings['backend']} failed", e)

    def _open(self) -> backends.Backend:
        record = read_tracking(self.run_dir)
        if record.get("config_hash") not in (None, self.identity):
            record = {}  # another config's tracker runs (`ofe.train.checkpoint` moves such a file aside)
        entry = find_entry(record, self.settings) or {}
        backend = backends.make(self.settings["backend"])
        t0 = time.perf_counter()
        self.run_id = backend.open(self.settings, entry.get("run_id"), self.meta)
        self.logged_step = max(int(entry.get("logged_step", -1)), backend.last_step())
        resumed = "resumed" if entry.get("run_id") == self.run_id else "started"
        after = f", logging after step {self.logged_step}" if self.logged_step >= 0 else ""
        print(f"[ofe] tracking: {resumed} {self.settings['backend']} run {self.run_id} in project "
              f"{self.settings['project']} ({time.perf_counter() - t0:.1f} s{after})", flush=True)
        self._entry = {**entry, **destination(self.settings), "run_id": self.run_id}
        self._save(force=True)  # the id first of all: a requeue must find it
        return backend

    def _handle(self, backend: backends.Backend, item: tuple) -> None:
        kind, payload = item
        if kind == "rows":
            for step, metrics in names.step_groups(payload):
                if step > self.logged_step:  # earlier steps: the tracker run holds them already
                    backend.log(step, metrics)
                    self.logged_step = step
                    self.logged += 1
            self._save()
        elif kind == "summary":
            numbers, tags = names.summary_values(payload)
            backend.summary(max(int(payload.get("steps_done", 0)), self.logged_step), numbers, tags)
            self._entry["summary"] = True
            self._save(force=True)
        elif kind == "quant":
            backend.summary(max(self.logged_step, 0), names.quant_values(payload), {})
            self._entry["quant"] = True
            self._save(force=True)

    def _save(self, force: bool = False) -> None:
        """This destination's entry in tracking.json, atomically; other destinations' entries are kept."""
        if not force and time.monotonic() - self._saved_at < SAVE_EVERY_S:
            return
        self._saved_at = time.monotonic()
        self._entry["logged_step"] = self.logged_step
        record = read_tracking(self.run_dir)
        others = [e for e in record.get("runs", []) if record.get("config_hash") in (None, self.identity)
                  and any(e.get(k) != v for k, v in destination(self.settings).items())]
        write_tracking(self.run_dir, {"config_hash": self.identity, "runs": [*others, self._entry]})

    def _fail(self, what: str, e: BaseException) -> None:
        self.failed = True
        warn(f"{what}; the run goes on without tracking", e)
