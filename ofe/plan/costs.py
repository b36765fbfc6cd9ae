"""What a checkpoint costs, by arithmetic on a run's config (torch-free, like `ofe.plan.memory`): its bytes,
and the process group's timeout that lets one rank read or write it while the others wait.

Checkpoint bytes: the fp32 parameters and buffers plus the optimiser state of the whole model
(`ofe.plan.memory.optimizer_state_bytes` of each tensor's full shape). A ddp checkpoint is written by rank 0
alone; an fsdp one by every rank, 1/N each, through the same filesystem: the same bytes cross it. The
metric rows beside them are negligible.

Collective timeout: rank 0 alone examines the checkpoints at a resume (reading checkpoint.pt, and
checkpoint.prev.pt when that one is unusable) and alone writes a ddp checkpoint (torch.save, fsynced),
while the other ranks wait in their next collective, which NCCL aborts after the process group's
timeout (torch's default: 10 minutes). The trainer sets

    timeout = the backend's default (nccl 600 s, gloo 1800 s) + 2 x checkpoint bytes / SLOW_STORAGE_BPS

two checkpoints' worth of reading or writing at 100 MB/s, a slow network filesystem. A timeout too short
kills a healthy job; one too long only delays noticing a hung rank. E.g. 7b with AdamW (16384-token
vocabulary): 78.1 GB, 600 + 1563 = 2163 s.
"""

from __future__ import annotations

from ofe.config import ModelConfig, OptimConfig
from ofe.plan import memory

NCCL_DEFAULT_TIMEOUT_S = 600.0  # torch's default process-group timeout for nccl
GLOO_DEFAULT_TIMEOUT_S = 1800.0  # and for gloo (torch.distributed.constants.default_pg_timeout)
SLOW_STORAGE_BPS = 100e6  # bytes/s: a slow network filesystem, the timeout's assumption
CHECKPOINT_IOS = 2  # checkpoints read or written by one rank between two collectives, at most


def checkpoint_bytes(m: ModelConfig, optim: OptimConfig) -> int:
    """Bytes of a run's checkpoint (module docstring): fp32 parameters and buffers, whole-model
    optimiser state."""
    shapes = memory.param_shapes(m)
    params = sum(memory.FP32 * memory.numel(s) for _, s in [*shapes, *memory.buffer_shapes(m)])
    state = sum(memory.optimizer_state_bytes(optim.name, name, s, optim.max_precond_dim) for name, s in shapes)
    return params + state


def collective_timeout_s(m: ModelConfig, optim: OptimConfig, cuda: bool) -> float:
    """The process group's timeout for a run (module docstring): the backend's default plus two
    checkpoints' reading or writing at SLOW_STORAGE_BPS."""
    floor = NCCL_DEFAULT_TIMEOUT_S if cuda else GLOO_DEFAULT_TIMEOUT_S
    return floor + CHECKPOINT_IOS * checkpoint_bytes(m, optim) / SLOW_STORAGE_BPS
