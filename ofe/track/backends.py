"""The two trackers behind one small interface (`Backend`), each library imported in `open`, inside the
tracker's thread: a run without tracking never imports them, and a tracked run's first step never waits
for them (wandb takes ~0.5 s to import and start, mlflow ~1.5 s on a 2-core VM).

A backend starts or resumes one tracker run, says the last step it already holds (a resumed run logs only
later steps), logs one step's metrics at a time, records the summary, and ends the run. Any exception it
raises is the tracker's to turn into a warning (`ofe.track.tracker`); nothing here catches.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

# In a file store's root, beside the experiments' folders (MLflow lists folders only).
EXPERIMENT_LOCK = ".ofe-experiments.lock"


@dataclass
class RunMeta:
    """What a tracker run is told once, when it is created: its name, group, parameters and tags."""

    name: str
    group: str
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


class Backend(Protocol):
    def open(self, settings: dict[str, Any], run_id: str | None, meta: RunMeta) -> str:
        """Start a tracker run (or resume `run_id`); returns its id."""

    def last_step(self) -> int:
        """The last step the tracker run already holds as far as the backend can tell (-1: none, or unknown)."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def summary(self, step: int, values: dict[str, float], tags: dict[str, str]) -> None: ...

    def close(self, ok: bool) -> None: ...


class WandbBackend:
    """Weights & Biases: offline by default (the run's files under `dir`, `wandb sync` uploads them)."""

    def open(self, settings: dict[str, Any], run_id: str | None, meta: RunMeta) -> str:
        import wandb

        # console off: W&B would otherwise wrap this process's stdout, which is the run's log; no system
        # stats, git or requirements: a sampler thread and subprocesses per run, for nothing ofe reads
        quiet = wandb.Settings(console="off", x_disable_stats=True, x_save_requirements=False, disable_git=True,
                               save_code=False, silent=True, x_disable_meta=True)
        # passed explicitly, read now: W&B reads WANDB_DIR once per process, at its first run
        directory = os.environ.get("WANDB_DIR") or settings.get("dir")
        if directory:
            os.makedirs(directory, exist_ok=True)
        self.run = wandb.init(project=settings["project"], group=meta.group, name=meta.name,
                              id=run_id or secrets.token_hex(6), resume="allow", mode=settings.get("mode", "offline"),
                              config=meta.params, tags=[f"{k}={v}" for k, v in meta.tags.items()][:64],
                              dir=directory, settings=quiet, reinit="create_new")
        return str(self.run.id)

    def last_step(self) -> int:
        # online, a resumed run starts at the server's next step; offline W&B cannot know (0)
        return int(self.run.starting_step) - 1

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def summary(self, step: int, values: dict[str, float], tags: dict[str, str]) -> None:
        self.run.summary.update({**values, **tags})

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class MlflowBackend:
    """MLflow through its client: the file store under the results folder by default, or any tracking URI."""

    BATCH = 1000  # MLflow's limit of metrics per log_batch call (params: 100)

    def open(self, settings: dict[str, Any], run_id: str | None, meta: RunMeta) -> str:
        uri = settings["tracking_uri"]
        if uri.startswith("file:"):
            # MLflow 3 refuses the file store unless asked: it is in maintenance mode, but it is the store
            # that needs no server and no database, and whose runs are folders of their own, so hundreds
            # of jobs on a shared filesystem write their runs at once (sqlite cannot); only the experiment's
            # creation needs a lock (`_experiment`)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                return run_id
            except MlflowException as e:  # deleted, or another store: a new run, said so
                print(f"[ofe] tracking: MLflow run {run_id} cannot be resumed ({e}); starting a new one", flush=True)
        experiment = self._experiment(settings["project"], uri)
        tags = {**meta.tags, "group": meta.group, "mlflow.runName": meta.name}
        self.run_id = self.client.create_run(experiment, run_name=meta.name, tags=tags).info.run_id
        params = [Param(k, str(v)) for k, v in meta.params.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        return self.run_id

    def _experiment(self, name: str, uri: str) -> str:
        """The id of experiment `name`, created if missing. A file store checks a name's uniqueness and then
        creates a folder with a random id, not atomically: two jobs starting together made two experiments
        called `name`, and every run of the second was hidden from the name's searches (seen in CI). So on a
        file store the check and the creation run under an exclusive lock beside the experiments; a server
        refuses a duplicate name itself, and the loser finds the winner's experiment."""
        if not uri.startswith("file:"):
            return self._get_or_create(name)
        import fcntl
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        store = Path(url2pathname(urlparse(uri).path))
        store.mkdir(parents=True, exist_ok=True)
        with open(store / EXPERIMENT_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            return self._get_or_create(name)

    def _get_or_create(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        for _ in range(3):  # a server: two runs may create the experiment at the same moment; one wins
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            try:
                return self.client.create_experiment(name)
            except MlflowException:
                time.sleep(0.2)
        raise RuntimeError(f"MLflow experiment {name!r} could neither be found nor created")

    def last_step(self) -> int:
        history = self.client.get_metric_history(self.run_id, "train/loss")
        return max((m.step for m in history), default=-1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), self.BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i:i + self.BATCH])

    def summary(self, step: int, values: dict[str, float], tags: dict[str, str]) -> None:
        # MLflow has no summary: the figures are metrics at the run's last step, the text its tags
        from mlflow.entities import RunTag

        self.log(step, values)
        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


# name -> factory; tests add a backend that fails on purpose
BACKENDS: dict[str, Callable[[], Backend]] = {"wandb": WandbBackend, "mlflow": MlflowBackend}


def make(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown tracking backend {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[name]()
