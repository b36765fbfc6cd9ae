"""Processes, devices and the wrapping of the model for data parallel (DDP) or sharded (FSDP2) training.

A job of N processes gets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT from submitit's tasks
(`ofe.cluster.jobs.TrainJob`) or any torchrun-like launcher; the process group is gloo on CPU, nccl on CUDA.
Each process of a node takes the GPU of its LOCAL_RANK among the devices the job was given
(`resolve_device`), and a job given GPUs that torch cannot use fails (`DeviceError`), never falls
back to CPU.
`train.parallel: fsdp` shards every transformer block, then the root (embeddings, final norm, the tied
head), with `fully_shard`; one process of an fsdp run still gets a (one-member) process group, so that
its model is the same sharded module as at N processes and resumes any sharded checkpoint.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ofe.config import TrainConfig


class DeviceError(RuntimeError):
    """The device the config asks for, or the GPUs the job was given, cannot be used: never a silent
    fallback to CPU, which would train in fp32 at a fraction of the speed and under another identity."""


# Where a job learns it was given GPUs: SLURM's variables for a job with GPUs, and the CUDA mask itself.
GPU_ENV = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES")


def gpus_given(env: Mapping[str, str] | None = None) -> str | None:
    """The variable that says this job was given GPUs ('NAME=value'), or None. An empty value, a
    SLURM_GPUS_ON_NODE of 0, and a CUDA_VISIBLE_DEVICES starting with -1 (the usual way to hide every
    GPU: CUDA stops reading the list at the first invalid index) give none."""
    env = os.environ if env is None else env
    for var in GPU_ENV:
        value = env.get(var, "").strip()
        nothing = ("", "-1", "0") if var == "SLURM_GPUS_ON_NODE" else ("", "-1")  # a count there, indices else
        if value.split(",")[0].strip() not in nothing:
            return f"{var}={value}"
    return None


def _why_no_cuda() -> str:
    """Why torch cannot use CUDA here, as far as torch can tell."""
    if torch.version.cuda is None and torch.version.hip is None:
        return f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch"
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda or torch.version.hip}) sees no usable GPU: "
            f"a driver older than this CUDA needs (compare nvidia-smi's 'CUDA Version'), no GPU on this node"
            + (f", or CUDA_VISIBLE_DEVICES={mask!r} naming none that exists" if mask is not None else ""))


def local_rank() -> int:
    """This process's rank on its node (LOCAL_RANK, from submitit's tasks or a torchrun-like launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device `train.device` means for the process of local rank `local_rank`. 'auto': CUDA when
    torch can use it, else CPU, unless the job was given GPUs (`gpus_given`): then DeviceError, as for
    'cuda' without CUDA. A bare 'cuda' (or 'auto' on CUDA) is cuda:LOCAL_RANK among the visible devices,
    one GPU per process of the node; a local rank with no GPU of its own is refused, never shared.
    The chosen GPU becomes the current device (nccl and FSDP's device mesh use it)."""
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        given = gpus_given()
        if name == "auto" and given is None:
            return torch.device("cpu")
        job = f"this job was given GPUs ({given}) but " if given else ""
        raise DeviceError(f"train.device {name!r}: {job}torch cannot use CUDA: {_why_no_cuda()}. To train on "
                          f"CPU on purpose, set train.device: cpu (and give the job no GPUs)")
    count = torch.cuda.device_count()
    device = torch.device("cuda" if name == "auto" else name)
    if device.index is None:
        if local_rank >= count:
            raise DeviceError(f"train.device {name!r}: process of local rank {local_rank} has no GPU of its own: "
                              f"{count} visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                              f"give the job one GPU per task (launcher gpus_per_node >= tasks_per_node)")
        device = torch.device("cuda", local_rank)
    elif local_rank > 0:
        raise DeviceError(f"train.device {name!r} names one GPU for every process of the node (this one has "
                          f"local rank {local_rank}); use 'cuda' or 'auto': each process takes cuda:LOCAL_RANK")
    elif device.index >= count:
        raise DeviceError(f"train.device {name!r}: only {count} GPU(s) visible, cuda:0 to cuda:{count - 1}")
    torch.cuda.set_device(device)
    return device


def runtime(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What a run actually ran on, for its summary and metadata: device, its type, the compute dtype
    and the GPU's name (None off CUDA)."""
    return {"device": str(device), "device_type": device.type, "dtype": str(dtype).replace("torch.", ""),
            "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


@dataclass
class Processes:
    """This process's place in the job, and whether it created the process group (and so ends it)."""

    rank: int
    world: int
    owns_group: bool = False

    def shutdown(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def start(parallel: str, device: torch.device, timeout_s: float | None = None) -> Processes:
    """Join the job's process group (from the environment), or make a one-process group for an fsdp
    run on its own: FSDP's device mesh needs one. `timeout_s`: how long a collective waits for the
    slowest rank before the job fails (None: torch's default, 10 minutes for nccl, 30 for gloo); the
    trainer derives it from the checkpoint that rank 0 may read or write meanwhile
    (`ofe.plan.costs.collective_timeout_s`). A group that exists already keeps its own."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        return Processes(rank, world)
    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    if world > 1:
        dist.init_process_group(backend=backend, **kwargs)
        return Processes(rank, world, owns_group=True)
    if parallel == "fsdp":  # an in-memory store: no address or port to agree on with no one
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
        return Processes(0, 1, owns_group=True)
    return Processes(0, 1)


def mixed_precision_dtype(tc: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 or None: the compute dtype `precision` asks for ('auto': bf16 on CUDA only). bf16 is always
    torch.autocast around forward and backward, on every path (one process, ddp, fsdp; CPU and CUDA):
    the weights, the residual stream, the norms and so the probed activations stay fp32 and the matmuls
    run in bf16, so that an optimiser run under fsdp computes what one under ddp does."""
    if tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def ieee_fp32_matmuls() -> None:
    """No TF32: fp32 matmuls and convolutions on CUDA stay IEEE fp32 (torch's new per-backend API; the
    legacy allow_tf32 flags must not be mixed with it). Under bf16 autocast the training matmuls are
    bf16 anyway; the fp32 ones left are the optimisers' (SOAP's and rotated Adafactor's eigenbases,
    Muon's Newton-Schulz on CPU) and the metrics', and those must be exact fp32 on every device and
    precision, so that a metric means the same on a CPU and on a GPU. Process-wide, set at every
    trainer start: it also undoes a TF32 setting made before."""
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    # convolutions and RNNs (ofe has none): each op's own setting, which wins over cudnn's shared one
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cudnn.rnn.fp32_precision = "ieee"


def wrap(model: nn.Module, tc: TrainConfig, device: torch.device, procs: Processes) -> nn.Module:
    """The module the training step calls: the model itself, DDP around it, or (fsdp) the model sharded
    in place (`fully_shard` changes its class, so `model` itself then is the sharded module). No
    MixedPrecisionPolicy: FSDP gathers the fp32 parameters and reduces fp32 gradients, and autocast
    makes the bf16 matmul copies, as under ddp (a bf16 policy would make the stream bf16 too)."""
    if tc.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:  # one all-gather per block, freed after it: memory ~ one block
            fully_shard(block)
        fully_shard(model)  # the rest: embeddings (tied head), final norm
        return model
    if procs.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    return model


@contextlib.contextmanager
def grad_sync(wrapped: nn.Module, sync: bool) -> Iterator[None]:
    """Run one micro-batch's forward and backward with (sync) or without DDP's gradient all-reduce:
    under ddp only the last micro-batch of a step communicates, the others accumulate into the
    replicated gradients. FSDP reduce-scatters every micro-batch (as torchtitan does): skipping it
    would keep every block's unsharded fp32 gradient on every rank until the last micro-batch, the
    whole model's gradients instead of 1/N of them."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapped, DistributedDataParallel) and not sync:
        with wrapped.no_sync():
            yield
        return
    yield


def all_mean(value: torch.Tensor, procs: Processes) -> torch.Tensor:
    """The mean of a scalar over the processes (every rank gets it)."""
    if procs.world > 1:
        dist.all_reduce(value)
        value = value / procs.world
    return value


def barrier(procs: Processes) -> None:
    if procs.world > 1:
        dist.barrier()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch from host memory on `device`. On CUDA it is copied from pinned memory without blocking the
    host: a plain copy from pageable memory waits for the GPU's queue to drain, a host sync at every
    step (the self-check counts them); the caching host allocator keeps the pinned block until the copy
    is done."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)

