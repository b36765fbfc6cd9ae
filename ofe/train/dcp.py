"""Sharded checkpoints of `train.parallel: fsdp` runs, with torch.distributed.checkpoint (DCP).

A sharded checkpoint is a folder, RUN/checkpoint.dcp: every process writes its own shards of the
model and the optimiser state (DCP's files and its `.metadata`, written last by rank 0), and rank 0
adds `state.pt`, everything else a resume needs (step, metric rows, status, config hash, RNG), as in
`checkpoint.pt` of a DDP run. The same durability rules as `ofe.train.checkpoint`:
- the folder is written as `.checkpoint.dcp.<step>.tmp` and renamed into place only when complete
  (`state.pt` last, after DCP's files are fsynced), so a kill never leaves a half checkpoint under the
  real name; the checkpoint it replaces is kept as `checkpoint.prev.dcp`;
- `state.pt` records the config hash, checked by `ofe.train.checkpoint.prepare_run_dir` before any resume.
DCP reshards at load: a checkpoint written by N processes resumes on M.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ofe.io import atomic_torch_save, fsync_dir
from ofe.runfolder import SHARDED, SHARDED_PREV
from ofe.train.parallel import Processes, barrier

STATE = "state.pt"  # rank 0's non-tensor state inside the folder
DCP_METADATA = ".metadata"  # DCP's index of the shards: written by rank 0 once every shard is


def save(state: dict[str, Any], model: nn.Module, opt: Any, out: Path, procs: Processes) -> None:
    """Every process calls this at the same step: each writes its shards, rank 0 the rest and the
    renames. `state` is what `checkpoint.pt` holds besides model and optimiser (rank 0's is kept)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = out / f".{SHARDED}.{state['step']}.tmp"  # one name every rank derives alike
    if procs.rank == 0 and tmp.exists():  # a killed attempt at this very step: never mix its files in
        shutil.rmtree(tmp)
    barrier(procs)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)  # collective; files fsynced
    if procs.rank == 0:
        atomic_torch_save(state, tmp / STATE)
        fsync_dir(tmp)
        _rotate(out, tmp)
    barrier(procs)  # nobody goes on (or stops) before the checkpoint has its name


def _rotate(out: Path, tmp: Path) -> None:
    """checkpoint.dcp -> checkpoint.prev.dcp, then tmp -> checkpoint.dcp. A folder cannot be renamed over
    a non-empty one, so the old previous is first renamed to a temp name (removed at the next start
    if a kill comes first). At every instant one complete checkpoint is under a real name."""
    current, previous = out / SHARDED, out / SHARDED_PREV
    old = None
    if current.exists():
        if previous.exists():
            old = out / f".{SHARDED_PREV}.old.tmp"
            if old.exists():
                shutil.rmtree(old)
            os.replace(previous, old)
        os.replace(current, previous)
    os.replace(tmp, current)
    fsync_dir(out)
    if old is not None:
        shutil.rmtree(old)


def read_state(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """`state.pt` of a sharded checkpoint folder; raises if the folder is not a complete checkpoint."""
    if not path.is_dir():
        raise ValueError(f"{path.name} is not a folder")
    if not (path / DCP_METADATA).is_file():
        raise ValueError(f"{path.name} has no {DCP_METADATA}")
    return torch.load(path / STATE, map_location=map_location, weights_only=True)


def load(model: nn.Module, opt: Any, path: Path) -> None:
    """Every process loads its shards of model and optimiser state (resharded from however many
    processes wrote them)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)  # the layout to load into: this job's shards
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
