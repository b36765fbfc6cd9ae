"""Which device a process trains on: never a silent CPU fallback for a job given GPUs, one GPU per local
rank among the job's own devices, and what the run records about it. No GPU is needed: torch.cuda's
answers are faked (monkeypatched) and the environments are the variables SLURM and submitit set."""

from __future__ import annotations

import os

import pytest
import torch

from ofe.cluster.jobs import export_processes
from ofe.train import parallel
from ofe.train.parallel import DeviceError, gpus_given, resolve_device, runtime

GPU_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES")


@pytest.fixture
def env():
    """os.environ as the test leaves it is undone afterwards, keys added by code under test included
    (monkeypatch restores only the keys it set itself)."""
    saved = dict(os.environ)
    for var in GPU_VARS:
        os.environ.pop(var, None)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as on a node where `count` GPUs are visible (0: CUDA unusable); returns the list of
    devices `set_device` was called with."""
    current = []

    def install(count: int) -> list:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", current.append)
        return current
    return install


@pytest.mark.parametrize("var, value, given", [
    ("SLURM_GPUS_ON_NODE", "2", True), ("SLURM_GPUS_ON_NODE", "0", False),
    ("SLURM_JOB_GPUS", "0", True), ("SLURM_JOB_GPUS", "3,5", True),
    ("CUDA_VISIBLE_DEVICES", "0", True), ("CUDA_VISIBLE_DEVICES", "GPU-8a3f2c1e-77b0-4e1a-9c1d-0f7e9b2a6d41", True),
    ("CUDA_VISIBLE_DEVICES", "", False), ("CUDA_VISIBLE_DEVICES", "-1", False)])
def test_which_environments_say_the_job_was_given_gpus(var, value, given):
    assert (gpus_given({var: value}) == f"{var}={value}") is given
    assert gpus_given({}) is None


def test_auto_without_gpus_given_or_cuda_is_the_cpu(env, fake_cuda):
    fake_cuda(0)
    env["CUDA_VISIBLE_DEVICES"] = ""  # hidden on purpose (as the tests do)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")


@pytest.mark.parametrize("var, value", [("SLURM_GPUS_ON_NODE", "1"), ("SLURM_JOB_GPUS", "2,3"),
                                        ("CUDA_VISIBLE_DEVICES", "GPU-8a3f2c1e")])
def test_a_job_given_gpus_that_cannot_use_cuda_fails_instead_of_training_on_cpu(env, fake_cuda, var, value):
    fake_cuda(0)  # a CPU-only wheel, a driver older than the wheel's CUDA, or a mask naming no device
    env[var] = value
    with pytest.raises(DeviceError) as err:
        resolve_device("auto")
    message = str(err.value)
    assert f"this job was given GPUs ({var}={value})" in message and "torch cannot use CUDA" in message
    assert "train.device: cpu" in message  # what to do to train on CPU on purpose
    assert isinstance(err.value, RuntimeError)


def test_cuda_asked_for_without_cuda_is_the_same_clear_error(env, fake_cuda):
    fake_cuda(0)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=rf"train.device '{name}': torch cannot use CUDA: .*train.device: cpu"):
            resolve_device(name)


def test_the_reason_names_a_cpu_only_build(env, fake_cuda, monkeypatch):
    fake_cuda(0)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(DeviceError, match="is a CPU-only build; install a CUDA build of torch"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    env["CUDA_VISIBLE_DEVICES"] = "7"
    with pytest.raises(DeviceError, match=r"\(CUDA 12\.8\) sees no usable GPU: a driver older .*"
                                          r"CUDA_VISIBLE_DEVICES='7' naming none that exists"):
        resolve_device("auto")


def test_each_local_rank_takes_its_own_gpu_and_none_is_shared(env, fake_cuda):
    current = fake_cuda(4)
    for rank in range(4):
        assert resolve_device("auto", rank) == torch.device("cuda", rank)
        assert resolve_device("cuda", rank) == torch.device("cuda", rank)
    assert current == [torch.device("cuda", r) for r in range(4) for _ in range(2)]  # the current device
    with pytest.raises(DeviceError, match=r"local rank 4 has no GPU of its own: 4 visible"):
        resolve_device("auto", 4)  # never rank 4 % 4 = 0, GPU 0 shared with rank 0
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    with pytest.raises(DeviceError, match=r"'cuda:1' names one GPU for every process .* local rank 1"):
        resolve_device("cuda:1", 1)
    with pytest.raises(DeviceError, match=r"only 4 GPU\(s\) visible, cuda:0 to cuda:3"):
        resolve_device("cuda:4")


def test_a_slurm_task_keeps_the_jobs_gpus_and_takes_cuda_local_rank_among_them(env, fake_cuda):
    """Task 2 of 4 on a shared node whose job got physical GPUs 4-7 (no device cgroups: CUDA sees all
    eight, the mask picks four). submitit's default export would set CUDA_VISIBLE_DEVICES=2, physical
    GPU 2, another job's; the mask stays, and the task takes cuda:2 within it, physical GPU 6."""
    env.update(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS="4", SLURM_JOB_NUM_NODES="1",
               SLURM_NODEID="0", SLURM_JOB_NODELIST="gpu17", SLURM_PROCID="2", SLURM_LOCALID="2",
               SLURM_GPUS_ON_NODE="4", SLURM_JOB_GPUS="4,5,6,7", CUDA_VISIBLE_DEVICES="4,5,6,7")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    export_processes()
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("2", "4", "2", "gpu17")
    current = fake_cuda(4)  # what CUDA shows under that mask: four devices, cuda:0..3
    assert resolve_device("auto", int(env["LOCAL_RANK"])) == torch.device("cuda", 2)
    assert current == [torch.device("cuda", 2)]
    fake_cuda(2)  # a job that got fewer GPUs than tasks: refused, not two processes on one GPU
    with pytest.raises(DeviceError, match="local rank 2 has no GPU of its own: 2 visible"):
        resolve_device("auto", 2)


def test_runtime_records_what_was_used(monkeypatch):
    assert runtime(torch.device("cpu"), torch.float32) == {
        "device": "cpu", "device_type": "cpu", "dtype": "float32", "gpu_name": None}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: f"NVIDIA H100 80GB HBM3 (#{d.index})")
    assert parallel.runtime(torch.device("cuda", 1), torch.bfloat16) == {
        "device": "cuda:1", "device_type": "cuda", "dtype": "bfloat16", "gpu_name": "NVIDIA H100 80GB HBM3 (#1)"}
