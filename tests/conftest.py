"""Shared fixtures: a small token cache from the embedded corpus and a tiny run config."""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pytest

if TYPE_CHECKING:
    from ofe.config import RunConfig
    from ofe.train.trainer import Trainer

# No test may reach a hub: fail fast instead of hanging on the closed network.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Every test runs on CPU, on a GPU machine too: the expectations are CPU ones (fp32, a CPU reference),
# and the two-task launch tests must not put NCCL on one GPU beside gloo. Hidden here, at import, before
# anything initialises CUDA; submitted local jobs inherit the mask (ofe.cluster.launch.local_gpus). The SLURM
# variables go too, or a test inside a GPU allocation would be "given GPUs" it cannot see
# (ofe.train.parallel.gpus_given). OFE_TEST_GPU=1 leaves the GPUs visible, for a test about the GPU.
if os.environ.get("OFE_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    for _var in ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS"):
        os.environ.pop(_var, None)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stdlib corpus capped at 120 files, tokenised once for the whole session."""
    from ofe.config import DataConfig
    from ofe.core.data import prepare

    out = tmp_path_factory.mktemp("data")
    prepare(DataConfig(max_documents=120), out)
    return out


def tiny_run(data_dir: Path, **sections) -> "RunConfig":
    """A seconds-long run: d 32, 2 layers, context 32, batch 4; `sections` override fields per section,
    e.g. tiny_run(d, train={"steps": 10}, model={"norm": "none"})."""
    from ofe.config import ModelConfig, OptimConfig, RunConfig, TrainConfig

    cfg = RunConfig(
        model=ModelConfig(n_layer=2, d_model=32, n_head=2, context=32),
        optim=OptimConfig(lr=3e-3, betas=(0.9, 0.95)),
        # device 'cpu', not 'auto': the tests' expectations are CPU fp32 ones, whatever the machine
        train=TrainConfig(steps=12, batch_size=4, log_every=4, eval_every=6, eval_batches=2,
                          checkpoint_every=4, threads=1, device="cpu"),
        data_dir=str(data_dir),
    )
    for name, values in sections.items():
        cfg = replace(cfg, **{name: replace(getattr(cfg, name), **values)})
    return cfg


def require_service(available: bool, what: str, how: str) -> None:
    """Skip when a system service a test needs is absent, saying how to enable it; under CI (CI=true,
    where .ci/run starts every service) fail instead: in CI no test may skip."""
    if available:
        return
    message = f"{what} is not available: {how}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails loudly: a test must never reach (or wait on) a hub.
    Use with `pytestmark = pytest.mark.usefixtures("no_network")`."""
    def refuse(*_a, **_k):
        raise AssertionError("a test tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


class Killed(Exception):
    """A test's kill of a training process, raised by `kill_after`'s hook."""


def kill_after(step: int) -> Callable[["Trainer"], None]:
    """An `on_checkpoint` hook of the Trainer that kills the run (raises `Killed`) right after its first
    checkpoint at or past `step`, on every rank."""
    def hook(trainer: "Trainer") -> None:
        if trainer.state.step >= step:
            raise Killed(trainer.state.step)

    return hook
