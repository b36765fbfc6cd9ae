"""Processes, devices and the wrapping of the model for data parallel (DDP) or sharded (FSDP2) training.

A job of N processes gets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT from submitit's tasks
(`ofe.launch.TrainJob`) or any torchrun-like launcher; the process group is gloo on CPU, nccl on CUDA.
`train.parallel: fsdp` shards every transformer block, then the root (embeddings, final norm, the tied
head), with `fully_shard`; one process of an fsdp run still gets a (one-member) process group, so that
its model is the same sharded module as at N processes and resumes any sharded checkpoint.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ofe.config import TrainConfig


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when available, else CPU. A bare 'cuda' in a job of several processes per node
    means this process's own GPU (LOCAL_RANK), never GPU 0 for all of them."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.cuda.device_count() > 1:
        name = f"cuda:{local_rank % torch.cuda.device_count()}"
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # nccl and FSDP's device mesh use the current device
    return device


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


def start(parallel: str, device: torch.device) -> Processes:
    """Join the job's process group (from the environment), or make a one-process group for an fsdp
    run on its own: FSDP's device mesh needs one."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        return Processes(rank, world)
    if world > 1:
        dist.init_process_group(backend=backend)
        return Processes(rank, world, owns_group=True)
    if parallel == "fsdp":  # an in-memory store: no address or port to agree on with no one
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        return Processes(0, 1, owns_group=True)
    return Processes(0, 1)


def mixed_precision_dtype(tc: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 or None: the compute dtype `precision` asks for ('auto': bf16 on CUDA only)."""
    if tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def uses_fsdp_mixed_precision(tc: TrainConfig, device: torch.device) -> bool:
    """On CUDA, FSDP casts the gathered parameters to bf16 itself (and reduces gradients in fp32)
    instead of autocast, which would otherwise cast every sharded weight again at every matmul."""
    return tc.parallel == "fsdp" and device.type == "cuda" and mixed_precision_dtype(tc, device) is not None


def wrap(model: nn.Module, tc: TrainConfig, device: torch.device, procs: Processes) -> nn.Module:
    """The module the training step calls: the model itself, DDP around it, or (fsdp) the model sharded
    in place (`fully_shard` changes its class, so `model` itself then is the sharded module)."""
    if tc.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs = {}
        if uses_fsdp_mixed_precision(tc, device):
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:  # one all-gather per block, freed after it: memory ~ one block
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)  # the rest: embeddings (tied head), final norm
        return model
    if procs.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    return model


@contextlib.contextmanager
def grad_sync(wrapped: nn.Module, sync: bool) -> Iterator[None]:
    """Run one micro-batch's forward and backward with (sync) or without the gradient all-reduce
    (DDP) or reduce-scatter (FSDP): only the last micro-batch of a step needs to communicate, the
    others accumulate locally."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapped, DistributedDataParallel) and not sync:
        with wrapped.no_sync():
            yield
        return
    if hasattr(wrapped, "set_requires_gradient_sync"):  # an FSDP2 module
        wrapped.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
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
