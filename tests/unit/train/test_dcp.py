"""Sharded (DCP) checkpoints keep the run folder's durability rules: another config's checkpoint is moved
aside, a torn latest falls back to the previous, a half-written folder is removed, and the final model
is readable for the int8 evaluation. One fsdp process (a one-member process group) is enough here."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from ofe.core.model import GPT
from ofe.runfolder import load_final_model
from ofe.train.trainer import train
from tests.helpers.runs import Killed, kill_after, tiny_run

FSDP = {"parallel": "fsdp"}


def _metrics(run) -> pd.DataFrame:
    return pd.read_parquet(run / "metrics.parquet")


def _stopped(data_dir, run, **optim):
    with pytest.raises(Killed):
        train(tiny_run(data_dir, train=FSDP, optim=optim), run, on_checkpoint=[kill_after(8)])


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train(tiny_run(data_dir, train=FSDP), out)
    return out


def test_stopped_sharded_run_resumes_as_if_uninterrupted(data_dir, tmp_path, capsys, straight):
    _stopped(data_dir, tmp_path)
    state = torch.load(tmp_path / "checkpoint.dcp" / "state.pt", weights_only=True)
    assert state["step"] == 8 and state["config_hash"] == tiny_run(data_dir, train=FSDP).config_hash()
    capsys.readouterr()
    train(tiny_run(data_dir, train=FSDP), tmp_path)
    assert f"resumed {tmp_path} at step 8 from checkpoint.dcp" in capsys.readouterr().out
    pd.testing.assert_frame_equal(_metrics(tmp_path), _metrics(straight))


def test_another_configs_sharded_checkpoint_is_moved_aside(data_dir, tmp_path, capsys, straight):
    _stopped(data_dir, tmp_path, lr=1e-2)
    capsys.readouterr()
    train(tiny_run(data_dir, train=FSDP), tmp_path)
    log = capsys.readouterr().out
    assert "checkpoint.dcp belongs to config" in log and "starting fresh" in log and "resumed" not in log
    (aside,) = (tmp_path / "stale").iterdir()
    assert {p.name for p in aside.iterdir()} == {"checkpoint.dcp", "checkpoint.prev.dcp"}
    pd.testing.assert_frame_equal(_metrics(tmp_path), _metrics(straight))


def test_a_ddp_checkpoint_is_another_config_for_an_fsdp_run(data_dir, tmp_path, capsys, straight):
    with pytest.raises(Killed):
        train(tiny_run(data_dir), tmp_path, on_checkpoint=[kill_after(8)])  # train.parallel: ddp, checkpoint.pt
    capsys.readouterr()
    train(tiny_run(data_dir, train=FSDP), tmp_path)
    assert "checkpoint.pt belongs to config" in capsys.readouterr().out
    pd.testing.assert_frame_equal(_metrics(tmp_path), _metrics(straight))


@pytest.mark.parametrize("damage", ["no .metadata", "truncated state.pt"])
def test_torn_sharded_checkpoint_falls_back_to_the_previous(data_dir, tmp_path, capsys, straight, damage):
    _stopped(data_dir, tmp_path)
    if damage == "no .metadata":
        (tmp_path / "checkpoint.dcp" / ".metadata").unlink()
    else:
        state = tmp_path / "checkpoint.dcp" / "state.pt"
        state.write_bytes(state.read_bytes()[:100])
    capsys.readouterr()
    train(tiny_run(data_dir, train=FSDP), tmp_path)
    log = capsys.readouterr().out
    assert "checkpoint.dcp is unreadable" in log and f"resumed {tmp_path} at step 4 from checkpoint.prev.dcp" in log
    pd.testing.assert_frame_equal(_metrics(tmp_path), _metrics(straight))


def test_a_half_written_sharded_checkpoint_is_removed_at_start(data_dir, tmp_path, capsys, straight):
    _stopped(data_dir, tmp_path)
    half = tmp_path / ".checkpoint.dcp.12.tmp"  # as a kill during the step-12 save leaves it
    shutil.copytree(tmp_path / "checkpoint.dcp", half)
    (half / ".metadata").unlink()
    capsys.readouterr()
    train(tiny_run(data_dir, train=FSDP), tmp_path)
    log = capsys.readouterr().out
    assert "removed .checkpoint.dcp.12.tmp, left by an interrupted write" in log
    assert not half.exists()
    pd.testing.assert_frame_equal(_metrics(tmp_path), _metrics(straight))


def test_final_sharded_model_loads_in_one_process_without_a_group(data_dir, tmp_path, straight):
    # the independent expectation: the same run replicated (ddp, 1 process) ends with the same weights
    train(tiny_run(data_dir), tmp_path)
    cfg = tiny_run(data_dir).model
    sharded, plain = GPT(cfg), GPT(cfg)
    load_final_model(straight, sharded, sharded=True)
    load_final_model(tmp_path, plain)
    for (name, a), (_, b) in zip(sharded.state_dict().items(), plain.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # two random inits would differ


def test_int8_evaluation_reads_the_sharded_final_model(data_dir, straight):
    from ofe.config import QuantConfig
    from ofe.train.quantise import quantise_run

    df = quantise_run(straight, QuantConfig(protocols=("dynamic_per_token",), calib_batches=1, eval_batches=1))
    assert len(df) == 1 and df.ppl_fp.notna().all() and (df.ppl_fp < 256).all()  # better than uniform bytes
