"""Gradient accumulation (train.micro_batch_size) and the checks on micro-batches and train.parallel."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ofe.cluster.launch import launch
from ofe.config import ConfigError, RunConfig, TrainConfig, check_micro_batch, check_parallel
from ofe.train.trainer import train
from tests.helpers.runs import tiny_run


def _curve(run, metric: str, site: str = "train") -> np.ndarray:
    df = pd.read_parquet(run / "metrics.parquet")
    return df[(df.site == site) & (df.metric == metric)].sort_values("step").value.to_numpy()


def test_four_micro_batches_reproduce_the_whole_batch(data_dir, tmp_path):
    # batch 8, micro-batches of 2: four forward/backward passes per step. clip 1.0 is active (the tiny
    # run's gradient norms are 1.4-2.8), so a missing 1/4 scale would change the curve, not only the norm.
    whole = train(tiny_run(data_dir, train={"batch_size": 8, "steps": 16}), tmp_path / "whole")
    micro = train(tiny_run(data_dir, train={"batch_size": 8, "steps": 16, "micro_batch_size": 2}),
                  tmp_path / "micro")
    assert whole["status"] == micro["status"] == "completed"
    # Tolerances: the two runs differ only by fp32 reassociation (four partial sums of per-token
    # gradients instead of one, the mean loss as a mean of four means): ~1e-7 relative per step, and
    # Adam's normalised update keeps it at that level over 16 steps (measured: 1.1e-7). 1e-5 leaves a
    # 100x margin and is still 10^4 below the loss's step-to-step change.
    for metric in ("loss", "grad_norm"):
        a, b = _curve(tmp_path / "whole", metric), _curve(tmp_path / "micro", metric)
        assert len(a) == len(b) == 16
        np.testing.assert_allclose(b, a, rtol=1e-5, err_msg=metric)
    np.testing.assert_allclose(_curve(tmp_path / "micro", "loss", "val"),
                               _curve(tmp_path / "whole", "loss", "val"), rtol=1e-5)
    k_whole, k_micro = (pd.read_parquet(tmp_path / d / "metrics.parquet").query("metric == 'kurtosis'")
                        for d in ("whole", "micro"))
    np.testing.assert_allclose(k_micro.value.to_numpy(), k_whole.value.to_numpy(), rtol=1e-4)


@pytest.mark.slow  # starts two training processes (submitit tasks)
def test_two_ddp_processes_accumulating_reproduce_one_process(data_dir, tmp_path):
    # per-process batch 4 in micro-batches of 2: DDP's no_sync on the first, the all-reduce on the last
    one = train(tiny_run(data_dir, train={"batch_size": 8}), tmp_path / "one")
    two = launch(tiny_run(data_dir, train={"batch_size": 8, "micro_batch_size": 2}), tmp_path / "two",
                 {"cluster": "local", "tasks_per_node": 2, "poll_s": 0.2})
    assert one["processes"] == 1 and two["processes"] == 2 and two["status"] == "completed"
    # 1e-5: as above, plus the 2-process all-reduce's own reassociation (measured ~1e-7 for 2 processes)
    for metric in ("loss", "grad_norm"):
        np.testing.assert_allclose(_curve(tmp_path / "two", metric), _curve(tmp_path / "one", metric),
                                   rtol=1e-5, err_msg=metric)


def test_micro_batch_must_divide_the_batch():
    with pytest.raises(ConfigError, match=r"train.micro_batch_size: 3 does not divide .* one of \[1, 2, 4, 8, 16\]"):
        TrainConfig(batch_size=16, micro_batch_size=3)
    with pytest.raises(ConfigError, match="train.micro_batch_size: must be > 0 or null"):
        RunConfig.from_dict({"train": {"micro_batch_size": 0}})
    assert TrainConfig(batch_size=16, micro_batch_size=16).micro_batch_size == 16
    assert TrainConfig(batch_size=16).micro_batch_size is None


def test_micro_batch_is_checked_again_with_the_number_of_processes():
    tc = TrainConfig(batch_size=16, micro_batch_size=8)  # fine for 1 or 2 processes, not for 4
    check_micro_batch(tc, 2)
    with pytest.raises(ConfigError, match=r"per-process batch of 4 \(train.batch_size 16 with 4 processes\); "
                                          r"choose null or one of \[1, 2, 4\]"):
        check_micro_batch(tc, 4)


def test_launch_refuses_a_micro_batch_its_processes_cannot_split(data_dir, tmp_path):
    cfg = tiny_run(data_dir, train={"batch_size": 4, "micro_batch_size": 4})
    with pytest.raises(ConfigError, match="train.micro_batch_size: 4 does not divide the per-process batch of 2"):
        launch(cfg, tmp_path, {"cluster": "local", "tasks_per_node": 2, "poll_s": 0.2})
    assert not (tmp_path / "submitit").exists()  # refused before any job was submitted


@pytest.mark.parametrize("name", ["adafactor", "soap", "rotated_adafactor", "muon"])
def test_fsdp_refuses_optimisers_that_need_whole_matrices(name):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"optim": {"name": name}, "train": {"parallel": "fsdp"}})
    message = str(e.value)
    assert f"optim.name: {name!r}" in message and "train.parallel: fsdp" in message
    assert "train.parallel: ddp" in message and "'adamw'" in message
    RunConfig.from_dict({"optim": {"name": name}, "train": {"parallel": "ddp"}})  # fine replicated


def test_fsdp_accepts_adamw():
    cfg = RunConfig.from_dict({"optim": {"name": "adamw"}, "train": {"parallel": "fsdp"}})
    check_parallel(cfg)
    assert cfg.train.parallel == "fsdp"


def test_validation_runs_in_micro_batches_and_logs_the_whole_batch_mean(data_dir, tmp_path):
    """log_val feeds the model at most micro_batch_size sequences at once, and its loss is the mean over
    the held-out batches of each whole batch's mean loss, computed here directly in float64."""
    import torch

    from ofe.train.trainer import Trainer

    tr = Trainer(tiny_run(data_dir, train={"batch_size": 8, "micro_batch_size": 2, "eval_batches": 3}), tmp_path)
    sizes = []
    hook = tr.model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    got = tr.log_val()
    hook.remove()
    assert sizes == [2] * 12  # 3 batches of 8 in micro-batches of 2
    with torch.no_grad():
        tr.model.eval()
        want = np.mean([tr.model(x, y)[1].double().item() for x, y in tr.data.val_batches(3)])
    assert got == pytest.approx(want, rel=1e-6)  # fp32 reassociation of equal-size chunk means only
