"""The memory plan of a grid: every run's per-process estimate (`ofe.plan.memory`) against the memory its
launcher entry gives it, printed by `python -m ofe check-config` and at the workflow's start, and a
ConfigError, before any job is submitted, for a run that would not fit.

The memory a run is checked against (GB = 10^9 bytes, so that "80 GB" is a GPU's nominal size and
stays below what SLURM's --mem=80G grants):
- a run on GPUs (train.device 'cuda...', or 'auto' where its launcher entry has gpus_per_node > 0):
  `gpu_mem_gb` per GPU, each process one GPU (launcher.scales.<scale>.gpu_mem_gb, else the launcher's
  own, else 80);
- on CPUs: the node's `mem_gb` shared by its tasks_per_node processes; without a mem_gb (the local
  executor) this machine's physical memory.
Processes are tasks_per_node x nodes for the scale, as `ofe.plan.validate.check_launcher` counts them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Any

from ofe.config import (FSDP_REFUSED, ConfigError, ModelConfig, OptimConfig, TrainConfig, build_section,
                        check_micro_batch)
from ofe.plan import memory

GB = 10**9
DEFAULT_GPU_MEM_GB = 80.0


@dataclass(frozen=True)
class Limit:
    """The memory one process may use, and the launcher key it comes from."""

    bytes: int
    source: str


@dataclass
class PlanRow:
    """One (scale, optimizer, parallel, micro-batch, processes) group of runs and its largest estimate."""

    scale: str
    optimizer: str
    parallel: str
    processes: int
    micro_batch: int
    precision: str
    cuda: bool
    estimate: memory.Estimate
    limit: Limit
    runs: int
    example: str
    """The id of the run with the largest estimate."""
    sections: tuple[ModelConfig, OptimConfig, TrainConfig]

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.limit.bytes


def _scale_value(launcher: dict, scale: str, key: str, default: Any) -> tuple[Any, str]:
    own = (launcher.get("scales") or {}).get(scale) or {}
    if key in own:
        return own[key], f"launcher.scales.{scale}.{key}"
    if key in launcher:
        return launcher[key], f"launcher.{key}"
    return default, f"launcher.{key} (default)"


def processes(launcher: dict, scale: str) -> int:
    """tasks_per_node x nodes for the scale; the local executor runs one node."""
    tasks, _ = _scale_value(launcher, scale, "tasks_per_node", 1)
    nodes = _scale_value(launcher, scale, "nodes", 1)[0] if launcher.get("cluster") == "slurm" else 1
    return int(tasks) * int(nodes)


def on_gpu(train: TrainConfig, launcher: dict, scale: str) -> bool:
    """Whether the run trains on CUDA: its device says so, or 'auto' with GPUs in its launcher entry."""
    if train.device != "auto":
        return train.device.startswith("cuda")
    return int(_scale_value(launcher, scale, "gpus_per_node", 0)[0]) > 0


def machine_memory() -> int:
    """This machine's physical memory in bytes (the local executor's limit)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_limit(launcher: dict, scale: str, cuda: bool) -> Limit:
    """What one process of `scale` may use (module docstring)."""
    if cuda:
        gb, key = _scale_value(launcher, scale, "gpu_mem_gb", DEFAULT_GPU_MEM_GB)
        return Limit(int(float(gb) * GB), f"{gb:g} GB per GPU ({key})")
    tasks = int(_scale_value(launcher, scale, "tasks_per_node", 1)[0])
    gb, key = _scale_value(launcher, scale, "mem_gb", None)
    share = f" / {tasks} tasks_per_node" if tasks > 1 else ""
    if gb is None:
        return Limit(machine_memory() // tasks, f"this machine's {machine_memory() / GB:.0f} GB{share}")
    return Limit(int(float(gb) * GB) // tasks, f"{gb:g} GB ({key}){share}")


TRAIN_KEYS = ("batch_size", "micro_batch_size", "precision", "parallel", "device", "probe_batch_size",
              "eval_batches")  # what the estimate reads


def _sections(run: Any) -> tuple[str, str, Any, Any]:
    """(run id, scale, a key of what the estimate reads, a builder of (model, optim, train)) of a Run
    or of a plan's run dict. A Run's sections are frozen dataclasses the grid shares between runs, so
    they are their own key; a plan's dicts are keyed by the values the estimate reads (a JSON key would
    cost a second for 10,000 runs)."""
    if isinstance(run, dict):
        c = run["config"]
        key = (tuple(c["model"].values()), c["optim"]["name"], c["optim"]["max_precond_dim"],
               tuple(c["train"][k] for k in TRAIN_KEYS))
        return run["run_id"], run["grid"]["scale"], key, lambda: (
            build_section(ModelConfig, c["model"], "model."), build_section(OptimConfig, c["optim"], "optim."),
            build_section(TrainConfig, c["train"], "train."))
    c = run.config
    return run.run_id, run.grid["scale"], (c.model, c.optim, c.train), lambda: (c.model, c.optim, c.train)


def plan(runs: Iterable[Any], launcher: dict) -> list[PlanRow]:
    """The largest estimate of each (scale, optimizer, parallel, micro-batch, processes) group, in the
    order the groups first appear. Each distinct config is estimated once (a grid of 10,000 runs has a
    handful). Also refuses, by name, a micro-batch that does not divide a process's share of the batch:
    the number of processes is known here, before any job (the trainer checks again)."""
    cache: dict[Any, tuple] = {}
    rows: dict[tuple, PlanRow] = {}
    for run in runs:
        run_id, scale, key, build = _sections(run)
        key = (scale, key)
        if key not in cache:
            m, o, t = build()
            n, cuda = processes(launcher, scale), on_gpu(t, launcher, scale)
            try:
                check_micro_batch(t, n)
            except ConfigError as e:
                raise ConfigError(f"scale {scale!r} runs on {n} processes (launcher.scales.{scale}."
                                  f"tasks_per_node x nodes), e.g. {run_id}: {e}") from None
            cache[key] = (m, o, t, n, cuda, memory.estimate(m, o, t, n, cuda), memory_limit(launcher, scale, cuda))
        m, o, t, n, cuda, est, limit = cache[key]
        group = (scale, o.name, t.parallel, est.micro_batch, n)
        row = rows.get(group)
        if row is None:
            rows[group] = PlanRow(scale, o.name, t.parallel, n, est.micro_batch, t.precision, cuda, est, limit,
                                  1, run_id, (m, o, t))
            continue
        row.runs += 1
        if est.total > row.estimate.total:
            row.estimate, row.example, row.sections, row.limit = est, run_id, (m, o, t), limit
    return list(rows.values())


def _gb(n: int) -> str:
    return f"{n / GB:.2f}"


def _size(n: int) -> str:
    """A table cell: G (10^9 bytes) from 1 GB up, M (10^6) below, so a tiny run's megabytes still show."""
    return f"{n / GB:.2f}G" if n >= GB else f"{n / 10**6:.1f}M"


HEADER = ("scale", "optimizer", "parallel", "procs", "micro", "params", "grads", "optim", "acts", "eval",
          "extra", "reserve", "total", "limit", "")


def format_plan(rows: list[PlanRow]) -> str:
    """The plan as a table, GB per process; the largest run of each group."""
    lines = [tuple(HEADER)]
    for r in rows:
        e = r.estimate
        lines.append((r.scale, r.optimizer, r.parallel, str(r.processes), str(r.micro_batch), _size(e.params),
                      _size(e.grads), _size(e.optimizer), _size(e.activations), _size(e.evaluation),
                      _size(e.extra), _size(e.reserve), _size(e.total), f"{_size(r.limit.bytes)} {'GPU' if r.cuda else 'CPU'}",
                      "ok" if r.fits else "TOO BIG"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    text = ["  ".join(v.rjust(w) if i >= 3 else v.ljust(w) for i, (v, w) in enumerate(zip(line, widths))).rstrip()
            for line in lines]
    note = ("memory per process (G = 10^9 bytes, M = 10^6), the largest run of each group; total = params + "
            "grads + optim + max(acts, the optimiser step's temporaries, eval: validation or the probe) + extra + "
            "reserve (ofe/plan/memory.py)")
    return "\n".join([note, *text])


def format_compact(rows: list[PlanRow]) -> str:
    """One line per group, for the workflow's start-up message."""
    return "\n".join(
        f"ofe: memory {r.scale} {r.optimizer} {r.parallel} x{r.processes} micro-batch {r.micro_batch}: "
        f"{_gb(r.estimate.total)} of {r.limit.bytes / GB:.0f} GB per {'GPU' if r.cuda else 'process'}"
        f"{'' if r.fits else '  TOO BIG'}"
        for r in rows)


def _what_fits(r: PlanRow) -> list[str]:
    """Changes of one knob that make the group's largest run fit, by the same estimate."""
    m, o, t = r.sections
    cuda, n, per = r.cuda, r.processes, t.batch_size // r.processes

    def fits(train: TrainConfig, procs: int) -> bool:
        return memory.estimate(m, o, train, procs, cuda).total <= r.limit.bytes

    out = []
    for mb in sorted((d for d in range(1, per) if per % d == 0), reverse=True):
        if fits(dataclasses.replace(t, micro_batch_size=mb), n):
            out.append(f"train.micro_batch_size: {mb}")
            break
    fsdp_ok = o.name not in FSDP_REFUSED
    if fsdp_ok and t.parallel != "fsdp" and fits(dataclasses.replace(t, parallel="fsdp"), n):
        out.append(f"train.parallel: fsdp on the same {n} processes")
    for procs in (2 * n, 4 * n, 8 * n, 16 * n):
        if t.batch_size % procs:
            break
        shard = dataclasses.replace(t, parallel="fsdp") if fsdp_ok else t
        if fits(dataclasses.replace(shard, micro_batch_size=None), procs):
            out.append(f"{procs} processes{' with train.parallel: fsdp' if fsdp_ok and t.parallel != 'fsdp' else ''}")
            break
    return out


def refusal(r: PlanRow) -> str:
    """Why the group's largest run does not fit, and the knobs that change it."""
    e = r.estimate
    where = f"launcher.scales.{r.scale}"
    lines = [
        (f"scale {r.scale!r} ({r.optimizer}, train.parallel: {r.parallel}, {r.processes} process"
        f"{'es' if r.processes > 1 else ''}, micro-batch {r.micro_batch}, "
        f"{f'{r.runs} runs such as' if r.runs > 1 else 'run'} {r.example}): "
        f"needs {_gb(e.total)} GB per {'GPU' if r.cuda else 'process'}, more than {r.limit.source} "
        f"(params {_gb(e.params)}, grads {_gb(e.grads)}, optimiser state {_gb(e.optimizer)}, activations "
        f"{_gb(e.activations)}, evaluation {_gb(e.evaluation)}, extra {_gb(e.extra)}, "
        f"reserve {_gb(e.reserve)})"),
        (f"  knobs: train.micro_batch_size (fewer sequences per forward: less activation memory); more "
        f"processes ({where}.tasks_per_node and gpus_per_node, {where}.nodes); train.parallel: fsdp "
        f"(shards params, grads and optimiser state over the processes)"),
    ]
    if r.optimizer in FSDP_REFUSED:
        lines.append(f"  {r.optimizer} cannot run under train.parallel: fsdp ({FSDP_REFUSED[r.optimizer]}), so "
                     f"more processes do not shrink its state; adamw can")
    fixes = _what_fits(r)
    lines.append(f"  by this estimate it fits with: {'; or '.join(fixes)}" if fixes else
                 f"  by this estimate no micro-batch or process count fits it on {r.limit.source}; a larger "
                 f"gpu_mem_gb / mem_gb (bigger GPUs or nodes), a smaller model or another optimiser would")
    return "\n".join(lines)


def check(rows: list[PlanRow]) -> None:
    """ConfigError naming every group whose largest run does not fit, with the knobs to turn."""
    bad = [refusal(r) for r in rows if not r.fits]
    if bad:
        raise ConfigError("memory: the estimate of a run exceeds its process's memory (ofe/plan/memory.py; "
                          "`python -m ofe check-config` prints the plan):\n" + "\n".join(bad))
