"""A run folder's durable state: which checkpoint to resume from, and what must not be trusted.

A run folder holds the outputs of exactly one config (`RunConfig.config_hash`). Before training starts,
`prepare_run_dir` (rank 0 alone) makes it so:
- temporary files a hard kill left behind (`.<name>.*.tmp`) are removed;
- outputs of another config (a reused folder, an edited config.yaml), the int8 rows in progress
  (`quant.partial.json`) and the tracker runs it was mirrored to (`tracking.json`) included, are moved,
  never deleted, into
  `stale/<UTC time>/`, so training neither resumes from them nor stops at their summary;
- the checkpoint to resume from is `checkpoint.pt`, else the one before it, `checkpoint.prev.pt`
  (kept by every save), when the latest is unreadable; if neither is usable the run starts fresh.
  An fsdp run's are the folders `checkpoint.dcp` and `checkpoint.prev.dcp` (`ofe.train.dcp`), under the
  same rules; a checkpoint of the other kind is another config's (train.parallel is in the hash).
Every such decision is printed as one `[ofe]` line in the run's log.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ofe.io import atomic_torch_save, read_metadata
from ofe.runfolder import (CHECKPOINT, METRICS, PREVIOUS, QUANT, QUANT_PARTIAL, SHARDED, SHARDED_PREV, STALE,
                           SUMMARY, TRACKING, recorded_hash)
from ofe.train import dcp
from ofe.train.state import RunState

# Temp files of the run's own outputs only: the launcher's (config.json, job.json, error.txt) may be
# being written by its head process at the very moment the job starts.
OWN_FILES = (CHECKPOINT, PREVIOUS, METRICS, SUMMARY, QUANT, QUANT_PARTIAL, SHARDED, SHARDED_PREV, TRACKING)
# What a resumable checkpoint holds: the model, the optimiser and the run's progress; one without them
# cannot be resumed exactly.
CHECKPOINT_KEYS = {"model", "optimizer", *RunState.keys()}
# A sharded checkpoint's state.pt: the same, its model and optimiser being DCP's shards beside it.
SHARDED_KEYS = CHECKPOINT_KEYS - {"model", "optimizer"}


def remove_temp_files(out: Path) -> list[str]:
    """Delete `.<name>.*.tmp` files (and, for sharded checkpoints, folders) of this run's outputs: the
    half-written bytes of a killed process, never renamed into place, and never read again."""
    removed = []
    for name in OWN_FILES:
        for tmp in sorted(out.glob(f".{name}.*.tmp")):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed


def _mismatch(have: str | None, want: str) -> str | None:
    if have is None:
        return f"records no config hash, this run is {want}"
    return None if have == want else f"belongs to config {have}, this run is {want}"


def _brief(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:160]}"


class _Aside:
    """Moves files into one `stale/<UTC time>/` folder per start, created on first use."""

    def __init__(self, out: Path) -> None:
        self.out, self.folder = out, None

    def move(self, path: Path) -> str:
        if self.folder is None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            folder, n = self.out / STALE / stamp, 1
            while folder.exists():  # two starts within a second
                folder, n = self.out / STALE / f"{stamp}-{n}", n + 1
            folder.mkdir(parents=True)
            self.folder = folder
        os.replace(path, self.folder / path.name)
        return str(self.folder.relative_to(self.out))


def _load(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, always on the CPU: loading to the GPU would pull a whole checkpoint into
    GPU memory just to read its hash, and left optimisers' `step` counters there (torch keeps a loaded
    `step` where it is): a host sync per parameter tensor per step. `load_state_dict` then copies the
    model's and the optimiser's tensors to their parameters' devices, and leaves `step` on the CPU."""
    if path.name in (SHARDED, SHARDED_PREV):
        return dcp.read_state(path, "cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _examine(path: Path, want: str) -> tuple[dict[str, Any] | None, str | None]:
    """(contents, None) for a checkpoint of config `want` that can be resumed, else (None, why not)."""
    try:
        ck = _load(path)
    except Exception as e:  # noqa: BLE001 - torn zip, empty file, not a checkpoint at all
        return None, f"is unreadable ({_brief(e)})"
    why = _mismatch(ck.get("config_hash"), want)
    needed = SHARDED_KEYS if path.name in (SHARDED, SHARDED_PREV) else CHECKPOINT_KEYS
    if why is None and needed - set(ck):
        why = f"is incomplete (no {sorted(needed - set(ck))})"
    return (ck, None) if why is None else (None, why)


def names(sharded: bool) -> tuple[str, str]:
    """The latest and the previous checkpoint's names, for a sharded (fsdp) run or not."""
    return (SHARDED, SHARDED_PREV) if sharded else (CHECKPOINT, PREVIOUS)


def prepare_run_dir(out: Path, want: str, sharded: bool = False) -> tuple[str, dict[str, Any]] | None:
    """Clean the run folder for config hash `want` (see the module docstring); return the checkpoint
    to resume from as (file name, contents), or None to start fresh. `sharded`: the run writes DCP
    folders; the contents returned are then its `state.pt` (`ofe.train.dcp.load` reads the shards). The
    contents are on the CPU (`_load`)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in remove_temp_files(out):
        print(f"[ofe] removed {name}, left by an interrupted write", flush=True)
    aside = _Aside(out)
    for name in (SUMMARY, METRICS, QUANT, QUANT_PARTIAL, TRACKING):  # tracking.json: another config's tracker runs
        path = out / name
        if not path.exists():
            continue
        try:
            record = json.loads(path.read_text()) if name.endswith(".json") else read_metadata(path)
            why = _mismatch(recorded_hash(record), want)
        except Exception as e:  # noqa: BLE001 - unreadable is as untrustworthy as foreign
            why = f"is unreadable ({_brief(e)})"
        if why:
            print(f"[ofe] {name} {why}: moved to {aside.move(path)}", flush=True)

    chosen, rejected = None, []
    own, other = names(sharded), names(not sharded)
    for name in own:
        if (out / name).exists():
            ck, why = _examine(out / name, want)
            if why is None:
                chosen = (name, ck)
                break
            rejected.append((name, why))
    for name in other:  # the other kind of checkpoint is another config's: train.parallel is hashed
        if (out / name).exists():
            _, why = _examine(out / name, want)
            rejected.append((name, why or f"is not the kind of checkpoint this run writes ({own[0]})"))
    # a rejected latest goes too: left in place, the next save would rotate it over the good previous
    then = f"resuming from {chosen[0]}" if chosen else "starting fresh"
    for name, why in rejected:
        print(f"[ofe] {name} {why}: moved to {aside.move(out / name)}; {then}", flush=True)
    return chosen


def load_checkpoint(out: Path, sharded: bool = False) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint `prepare_run_dir` left to resume from (for ranks other than 0, which run after
    it), on the CPU (`_load`)."""
    for name in names(sharded):
        if (out / name).exists():
            return name, _load(out / name)
    return None


def save_checkpoint(state: dict[str, Any], out: Path) -> None:
    """Write `checkpoint.pt` durably, keeping the one it replaces as `checkpoint.prev.pt`."""
    atomic_torch_save(state, out / CHECKPOINT, previous=out / PREVIOUS)
