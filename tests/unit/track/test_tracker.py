"""The tracker's thread and queue, with a backend that hangs: the training thread never waits, what does
not fit is dropped and counted, and close() waits no longer than its timeout. The names are pure functions."""

from __future__ import annotations

import threading
import time

import pytest

from ofe.track import backends, names
from ofe.track.backends import RunMeta
from ofe.track.tracker import Tracker


class Hangs:
    """A backend whose log calls wait until `release` is set."""

    def __init__(self) -> None:
        self.release, self.steps = threading.Event(), []

    def open(self, settings, run_id, meta):
        return "h1"

    def last_step(self):
        return -1

    def log(self, step, metrics):
        self.release.wait()
        self.steps.append(step)

    def summary(self, step, values, tags):
        pass

    def close(self, ok):
        pass


@pytest.fixture
def hangs(monkeypatch):
    backend = Hangs()
    monkeypatch.setitem(backends.BACKENDS, "hangs", lambda: backend)
    yield backend
    backend.release.set()


def _row(step: int) -> tuple:
    return (step, step * 10, -1, "train", "loss", 1.0 / (step + 1))


def test_a_hanging_tracker_never_blocks_a_step_and_drops_what_does_not_fit(tmp_path, hangs, capsys):
    tracker = Tracker(tmp_path, {"backend": "hangs", "project": "p"}, "h", RunMeta("r", "g"), queue_size=4)
    t0 = time.perf_counter()
    for step in range(50):
        tracker.rows([_row(step)])
    assert time.perf_counter() - t0 < 0.5  # 50 steps queued or dropped at once, the tracker hanging
    # one item in the backend's hands, 4 in the queue: the other 45 dropped, and counted
    assert 44 <= tracker.dropped <= 46
    t0 = time.perf_counter()
    assert tracker.close(timeout=0.5) is False
    assert time.perf_counter() - t0 < 2.0
    out = capsys.readouterr().out
    assert "steps are dropped" in out and "did not finish within 0.5 s" in out
    assert f"{tracker.dropped} step(s) were dropped" in out


def test_a_slow_tracker_gets_everything_at_close(tmp_path, hangs, capsys):
    tracker = Tracker(tmp_path, {"backend": "hangs", "project": "p"}, "h", RunMeta("r", "g"))
    for step in range(20):
        tracker.rows([_row(step)])
    hangs.release.set()
    assert tracker.close(timeout=30) is True
    assert hangs.steps == list(range(20)) and tracker.dropped == 0


def test_metric_names_follow_the_parquet_sites_and_metrics():
    rows = [(4, 512, 3, "block_input", "kurtosis", 2.5), (4, 512, -1, "train", "loss", 3.0),
            (4, 512, 2, "attention", "sink_rate", 0.0), (0, 0, -1, "val", "loss", 5.0)]
    assert names.step_groups(rows) == [
        (0, {"tokens": 0.0, "val/loss": 5.0}),
        (4, {"tokens": 512.0, "kurtosis/block_input/layer_3": 2.5, "sink_rate/attention/layer_2": 0.0,
             "train/loss": 3.0})]
    assert list(names.step_groups(rows)[1][1])[-1] == "train/loss"  # run-level rows last (see step_groups)
    assert names.quant_values([("dynamic_per_token", 8, 10.0, 10.5, 0.5)]) == {
        "int8/dynamic_per_token/bits8/ppl_fp": 10.0, "int8/dynamic_per_token/bits8/ppl_q": 10.5,
        "int8/dynamic_per_token/bits8/delta": 0.5}
    assert names.flatten({"model": {"norm": "rmsnorm"}, "optim": {"betas": [0.9, 0.95]}}) == {
        "model.norm": "rmsnorm", "optim.betas": [0.9, 0.95]}
    assert names.seed_group("tiny/op/beta0.2/adamw/lr0.01/seed1_optim.eps0.001") == \
        "tiny/op/beta0.2/adamw/lr0.01/optim.eps0.001"
    assert names.seed_group("tiny/op/beta0.2/adamw/lr0.01/seed1") == "tiny/op/beta0.2/adamw/lr0.01"
    assert names.run_name("/x/results/runs/tiny/op/beta1/adamw/lr0.01/seed0") == "tiny/op/beta1/adamw/lr0.01/seed0"
    numbers, tags = names.summary_values({"status": "diverged", "final_val_loss": None, "steps_done": 7,
                                          "config_hash": "abc", "config": {"x": 1}})
    assert (numbers, tags) == ({"summary/steps_done": 7.0}, {"status": "diverged", "config_hash": "abc"})
