"""Sharded training (train.parallel: fsdp): 2 gloo processes on CPU reproduce a 1-process run, and
sharded checkpoints resume exactly, on 2 processes or (resharded) on 1."""

from __future__ import annotations

import json
import shutil
import socket
import traceback

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from ofe.cluster.launch import launch
from ofe.config import RunConfig
from ofe.train.trainer import train
from tests.helpers.runs import Killed, kill_after, tiny_run

pytestmark = pytest.mark.slow  # starts processes: two training processes (submitit tasks)

KEY = ["step", "layer", "site", "metric"]
# per-process batch 2 in micro-batches of 1: every step accumulates, with FSDP's gradient sync off
# for the first micro-batch. clip 1.0 is active (gradient norms 1.4-2.8): a clip by a rank's local
# norm would change the curve.
SHARDED = {"steps": 12, "batch_size": 4, "parallel": "fsdp", "micro_batch_size": 1}


def _rank_main(rank: int, world: int, port: int, config: dict, out: str, kill_at: int | None, errors) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    hooks = [kill_after(kill_at)] if kill_at is not None else []
    try:
        train(RunConfig.from_dict(config), out, on_checkpoint=hooks)
    except Killed:
        pass
    except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
        errors.put(f"rank {rank}: {traceback.format_exc()}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(cfg: RunConfig, out, world: int = 2, kill_at: int | None = None) -> None:
    """`train` in `world` spawned processes (RANK, WORLD_SIZE, MASTER_* as a launcher sets them);
    `kill_at`: every rank stops right after the first checkpoint at or beyond that step (a kill)."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, cfg.to_dict(), str(out), kill_at, errors))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    failures = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert not failures and all(p.exitcode == 0 for p in procs), (failures, [p.exitcode for p in procs])


def _metrics(run) -> pd.DataFrame:
    return pd.read_parquet(run / "metrics.parquet")


def _value(df: pd.DataFrame, site: str, metric: str) -> np.ndarray:
    return df[(df.site == site) & (df.metric == metric)].sort_values(["step", "layer"]).value.to_numpy()


def assert_same_run(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Equal up to the float summation order of 1 vs 2 processes: gradients reduced over 2 shards and
    the loss averaged over 2 half-batches reassociate fp32 sums (~1e-7 relative per step; the DDP test
    allows 1e-4 on the loss); the metrics are then those of weights equal to ~1e-6."""
    assert len(got) == len(want) and set(map(tuple, got[KEY].to_numpy())) == set(map(tuple, want[KEY].to_numpy()))
    for site, metric in [("train", "loss"), ("train", "grad_norm"), ("val", "loss")]:
        np.testing.assert_allclose(_value(got, site, metric), _value(want, site, metric), rtol=1e-5,
                                   err_msg=f"{site} {metric}")
    g, w = (df.set_index(KEY).value.sort_index() for df in (got, want))
    np.testing.assert_allclose(g.to_numpy(), w.to_numpy(), rtol=1e-3, atol=1e-6)  # every metric, every site


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    """The reference: the same global batch on 1 process, replicated, no accumulation."""
    out = tmp_path_factory.mktemp("one")
    train(tiny_run(data_dir, train={k: v for k, v in SHARDED.items() if k in ("steps", "batch_size")}), out)
    return _metrics(out)


@pytest.fixture(scope="module")
def sharded_run(data_dir, tmp_path_factory):
    """An uninterrupted 2-process fsdp run, launched as 2 submitit tasks (as on a cluster)."""
    out = tmp_path_factory.mktemp("sharded")
    summary = launch(tiny_run(data_dir, train=SHARDED), out, {"cluster": "local", "tasks_per_node": 2, "poll_s": 0.2})
    return out, summary


def test_two_sharded_processes_reproduce_one_process(one_process, sharded_run):
    out, summary = sharded_run
    assert summary["status"] == "completed" and summary["processes"] == 2
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    assert (out / "checkpoint.dcp" / ".metadata").is_file() and not (out / "checkpoint.pt").exists()
    shards = sorted(p.name for p in (out / "checkpoint.dcp").glob("*.distcp"))
    assert len(shards) == 2  # each process wrote its own shard
    assert_same_run(_metrics(out), one_process)


@pytest.fixture(scope="module")
def stopped(data_dir, tmp_path_factory):
    """A 2-process fsdp run killed right after its step-8 checkpoint."""
    out = tmp_path_factory.mktemp("stopped")
    run_processes(tiny_run(data_dir, train=SHARDED), out, kill_at=8)
    assert not (out / "summary.json").exists()
    return out


def test_sharded_run_resumes_on_two_processes_as_if_uninterrupted(data_dir, sharded_run, stopped, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    state = torch.load(run / "checkpoint.dcp" / "state.pt", weights_only=True)
    assert state["step"] == 8 and torch.load(run / "checkpoint.prev.dcp" / "state.pt", weights_only=True)["step"] == 4
    run_processes(tiny_run(data_dir, train=SHARDED), run)
    # the same 2 processes, the same sums in the same order: equal, not merely close
    pd.testing.assert_frame_equal(_metrics(run), _metrics(sharded_run[0]))


def test_two_process_checkpoint_resumes_on_one_process(data_dir, one_process, sharded_run, stopped, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    capsys.readouterr()
    summary = train(tiny_run(data_dir, train=SHARDED), run)  # 1 process: DCP reshards 2 shards into 1
    assert f"resumed {run} at step 8 from checkpoint.dcp" in capsys.readouterr().out
    assert summary["status"] == "completed" and summary["processes"] == 1 and summary["steps_done"] == 12
    df = _metrics(run)
    assert not df.duplicated(KEY).any()
    before = df[df.step < 8].reset_index(drop=True)  # logged by the 2 processes, kept as they were
    pd.testing.assert_frame_equal(before, _metrics(sharded_run[0]).query("step < 8").reset_index(drop=True))
    assert_same_run(df, one_process)  # and continued as the 1-process run would have
