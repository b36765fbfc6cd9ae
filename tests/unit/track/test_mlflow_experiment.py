"""Many jobs starting at once on one MLflow file store find or create one experiment, not one each: the file
store's own name check is not atomic (two concurrent jobs once made two experiments called `grid`, and the
runs of one were hidden from the name's searches)."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest

from ofe.track.backends import MlflowBackend

pytestmark = pytest.mark.slow  # starts processes, each importing MLflow

JOBS = 6


def _create(uri: str, barrier, out) -> None:
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    from mlflow.tracking import MlflowClient

    backend = MlflowBackend()
    backend.client = MlflowClient(tracking_uri=uri)
    backend.client.search_experiments()  # MLflow imported and the store opened before the race starts
    barrier.wait()
    out.put(backend._experiment("grid", uri))


def test_concurrent_jobs_share_one_experiment(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(JOBS), ctx.Queue()
    procs = [ctx.Process(target=_create, args=(uri, barrier, out)) for _ in range(JOBS)]
    for p in procs:
        p.start()
    ids = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    from mlflow.tracking import MlflowClient

    named = [e for e in MlflowClient(tracking_uri=uri).search_experiments() if e.name == "grid"]
    assert len(named) == 1 and set(ids) == {named[0].experiment_id}
