"""Fixtures and the session's environment: no hub, no GPU (set at import, for the whole session), a small
token cache from the embedded corpus, no network. What tests import (a tiny run config, ...) lives in
tests/helpers/."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stdlib corpus capped at 120 files, tokenised once for the whole session."""
    from ofe.config import DataConfig
    from ofe.core.data import prepare

    out = tmp_path_factory.mktemp("data")
    prepare(DataConfig(max_documents=120), out)
    return out


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails loudly: a test must never reach (or wait on) a hub.
    Use with `pytestmark = pytest.mark.usefixtures("no_network")`."""
    def refuse(*_a, **_k):
        raise AssertionError("a test tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)



@pytest.fixture
def hub_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning as on a machine with network (`ofe.plan.offline`): HF_HUB_OFFLINE and HF_DATASETS_OFFLINE
    are 0 for this test, so a hub name not in the local cache passes planning as it does online. The
    libraries themselves keep the session's offline flag, read at their import, so nothing downloads;
    pair it with `no_network` where a test could reach a hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
