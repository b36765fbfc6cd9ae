"""Data parallel: 2 processes (gloo, on CPU) launched as submitit tasks reproduce a 1-process run of the
same global batch."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ofe.cluster.launch import launch
from ofe.train.trainer import train
from tests.helpers.runs import tiny_run

pytestmark = pytest.mark.slow  # starts processes: two training processes (submitit tasks)


def test_two_process_loss_curve_equals_one_process(data_dir, tmp_path):
    cfg = tiny_run(data_dir, train={"steps": 12, "batch_size": 4})
    single = train(cfg, tmp_path / "one")
    double = launch(cfg, tmp_path / "two", {"cluster": "local", "tasks_per_node": 2, "poll_s": 0.2})
    assert single["processes"] == 1 and double["processes"] == 2
    assert double["status"] == "completed"
    one, two = (pd.read_parquet(tmp_path / d / "metrics.parquet") for d in ("one", "two"))
    loss = lambda df: df[(df.site == "train") & (df.metric == "loss")].value.to_numpy()  # noqa: E731
    assert len(loss(two)) == 12
    # mean of two half-batch means == the full-batch mean; only float summation order differs
    assert abs(loss(one) - loss(two)).max() < 1e-4, (loss(one), loss(two))
    kurt = lambda df: df[df.metric == "kurtosis"].value.to_numpy()  # noqa: E731
    assert abs(kurt(one) - kurt(two)).max() < 1e-3  # same weights, so the same metrics
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
