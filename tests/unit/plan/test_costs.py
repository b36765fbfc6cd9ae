"""What checkpoints cost (ofe/plan/costs.py): the process group's timeout that covers a checkpoint read or
written by one rank, and the paper-scale presets' checkpoint intervals, each under 5% of the training
time by the assumptions their docstring states."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch
import yaml

from ofe.config import ModelConfig, OptimConfig
from ofe.plan import costs, grid, presets
from ofe.train import parallel
from tests.helpers import REPO
from tests.helpers.runs import tiny_run


def test_the_default_timeouts_are_torchs():
    from torch.distributed import constants

    assert constants.default_pg_timeout == timedelta(seconds=costs.GLOO_DEFAULT_TIMEOUT_S)
    # nccl's default is 10 minutes (torch.distributed.constants has it only in a CUDA build)
    if constants.default_pg_nccl_timeout is not None:
        assert constants.default_pg_nccl_timeout == timedelta(seconds=costs.NCCL_DEFAULT_TIMEOUT_S)


def test_the_timeout_of_a_known_shape_in_closed_form():
    """One layer, d 8, 4 heads, context 4, vocabulary 16, Pre-LN, AdamW: parameters wte 16 x 8, wpe
    4 x 8, two LayerNorms and the final one (3 x 2 x 8), qk_bias 16, qkv 24 x 8, proj 8 x 8, MLP 2 x 32 x 8;
    buffer beta 2. Checkpoint: 4 bytes per parameter and buffer entry, 8 per parameter entry (two moments)
    and 4 per tensor (step): 12 n + 4 b + 4 t."""
    m = ModelConfig(vocab_size=16, context=4, n_layer=1, n_head=4, d_model=8)
    n = 16 * 8 + 4 * 8 + 3 * 2 * 8 + 16 + 24 * 8 + 8 * 8 + 2 * 32 * 8
    tensors = 2 + 6 + 1 + 1 + 1 + 2  # wte wpe, 3 norms x (weight, bias), qk_bias, qkv, proj, fc + proj
    want = 12 * n + 4 * 2 + 4 * tensors
    assert costs.checkpoint_bytes(m, OptimConfig()) == want
    assert costs.collective_timeout_s(m, OptimConfig(), cuda=True) == pytest.approx(600 + 2 * want / 100e6)
    assert costs.collective_timeout_s(m, OptimConfig(), cuda=False) == pytest.approx(1800 + 2 * want / 100e6)


def test_the_7b_timeout_covers_two_checkpoints_at_100_MB_per_s():
    m = ModelConfig(**{**presets.resolve("7b", "pre_ln")["model"], "vocab_size": 16384})
    n = sum(math.prod(s) for _, s in [("wte", (16384, 4096)), ("wpe", (512, 4096))]) + 32 * 12 * 4096**2
    timeout = costs.collective_timeout_s(m, OptimConfig(), cuda=True)
    assert 600 + 2 * 12 * n / 100e6 < timeout < 600 + 2 * 12.01 * n / 100e6  # + vectors, buffers, steps
    assert 2100 < timeout < 2200  # about 36 minutes instead of NCCL's 10


def test_the_trainer_gives_init_process_group_the_timeout(data_dir, tmp_path, monkeypatch):
    """A one-process fsdp run makes its own process group: it receives the run's timeout."""
    got = {}
    real = torch.distributed.init_process_group

    def spy(*args, **kwargs):
        got.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.distributed, "init_process_group", spy)
    cfg = tiny_run(data_dir, train={"parallel": "fsdp", "device": "cpu"})
    from ofe.train.trainer import Trainer

    trainer = Trainer(cfg, tmp_path)
    trainer.procs.shutdown()
    want = 1800 + 2 * costs.checkpoint_bytes(cfg.model, cfg.optim) / 100e6
    assert got["timeout"] == timedelta(seconds=want) and got["backend"] == "gloo"


def test_start_without_a_timeout_leaves_torchs_default(monkeypatch):
    got = {}
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: got.update(kw))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    parallel.start("fsdp", torch.device("cpu"))
    assert "timeout" not in got
    parallel.start("fsdp", torch.device("cpu"), timeout_s=90.0)
    assert got["timeout"] == timedelta(seconds=90)


# ---- the presets' checkpoint intervals --------------------------------------------------------------

def soap_checkpoint_bytes(L: int, d: int, V: int, T: int) -> int:
    """SOAP's checkpoint of a Pre-LN model, by hand: 4 bytes of weight and 8 of moments per parameter,
    4 per buffer entry, and per matrix side k no larger than 10,000 a k x k statistic and eigenbasis
    (8 k^2): per block qkv (3d, d), proj (d, d), fc (4d, d), proj (d, 4d); wte (V, d), wpe (T, d)."""
    def rotated(*sides: int) -> int:
        return sum(k * k for k in sides if k <= 10_000)

    n = V * d + T * d + L * (12 * d * d + 2 * d + 2 * 2 * d) + 2 * d  # qk_bias 2d, two LNs 4d; final LN
    per_block = rotated(3 * d, d) + rotated(d, d) + rotated(4 * d, d) + rotated(d, 4 * d)
    return 12 * n + 4 * 2 * L + 8 * (L * per_block + rotated(V, d) + rotated(T, d))


@pytest.mark.parametrize("scale, layers, d", [("1.2b", 24, 2048), ("7b", 32, 4096)])
def test_a_preset_checkpoint_costs_under_5_percent_of_the_training_time(scale, layers, d):
    """The stated assumptions: 6 N D FLOPs per step, D = 64 x 512 tokens, on 8 GPUs of 989 TFLOP/s at
    50% MFU; the largest checkpoint (SOAP's), vocabulary 16384, at 1 GB/s."""
    resolved = presets.resolve(scale, "pre_ln")
    every = resolved["train"]["checkpoint_every"]
    m = ModelConfig(**{**resolved["model"], "vocab_size": 16384})
    assert (m.n_layer, m.d_model, m.context) == (layers, d, 512)
    n = 16384 * d + 512 * d + layers * 12 * d * d  # + vectors: negligible for the FLOPs
    step_s = 6 * n * 64 * 512 / (8 * 989e12 * 0.5)
    checkpoint_s = soap_checkpoint_bytes(layers, d, 16384, 512) / 1e9
    assert checkpoint_s / (every * step_s) < 0.05
    assert soap_checkpoint_bytes(layers, d, 16384, 512) == costs.checkpoint_bytes(m, OptimConfig(name="soap"))
    # and not needlessly long: at most twice the shortest interval that stays under 5%
    assert checkpoint_s / (every * step_s) > 0.025


def test_a_config_setting_checkpoint_every_wins_over_the_preset():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    point = {"scale": "7b", "block": "pre_ln", "optimizer": "adamw", "lr": 1e-4, "seed": 0, "beta": None}
    # config.yaml sets none, so a paper scale added to the default grid keeps its preset's interval
    assert "checkpoint_every" not in config["defaults"]["train"]
    assert grid.resolve_run(config, point).config.train.checkpoint_every == 7000  # the preset's
    config["defaults"]["train"]["checkpoint_every"] = 100
    assert grid.resolve_run(config, point).config.train.checkpoint_every == 100  # the config's wins
    tiny = {**point, "scale": "tiny"}
    del config["defaults"]["train"]["checkpoint_every"]
    assert grid.resolve_run(config, tiny).config.train.checkpoint_every == 100  # TrainConfig's default
