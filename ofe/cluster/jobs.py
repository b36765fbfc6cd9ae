"""What a job runs on its node: the callables `ofe.cluster.launch` submits through submitit.

`TrainJob` trains one run, then quantises it (int8 perplexity, `ofe.train.quantise`) on the same node and
GPU; `InspectJob` runs `ofe inspect` on one checkpoint of a checkpoint study; `LocalGpus` gives a local
job the GPUs it may use. Both jobs are submitit `Checkpointable`s: on preemption or time-out submitit
requeues the same call, and training resumes from the run's own checkpoint. Training and the pretrained
models are imported inside the callables, on the node, never when the head imports this module.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import submitit


class TrainJob(submitit.helpers.Checkpointable):
    """Callable submitted to the cluster; its default `checkpoint` resubmits the same arguments."""

    def __call__(self, config_path: str, out_dir: str, quant: dict[str, Any] | None = None) -> dict[str, Any]:
        from ofe.train.trainer import load_run_config, train

        export_processes()
        summary = train(load_run_config(config_path), out_dir)
        if quant is not None and int(os.environ.get("RANK", 0)) == 0:  # rank 0 evaluates the saved model
            quantise_in_process(out_dir, quant)
        return summary


def export_processes() -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK and MASTER_* for DDP/FSDP from submitit's tasks (a job of several).
    CUDA_VISIBLE_DEVICES stays as the job was given it: submitit's default sets it to the local rank,
    which is physical GPU LOCAL_RANK, another job's on a shared node without device cgroups. Each process
    takes cuda:LOCAL_RANK among the job's own devices instead (`ofe.train.parallel.resolve_device`)."""
    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


class LocalGpus(submitit.helpers.Checkpointable):
    """A local job's callable, run with the GPUs the job may use. submitit's local executor sets the
    job's CUDA_VISIBLE_DEVICES itself: "" (no GPU at all) unless gpus_per_node is given, and then 0..N-1
    whatever the head's own mask. So ofe passes no gpus_per_node to it and sets the mask in the job's
    process, before anything there initialises CUDA (`local_gpus` says which). Not submitit's `setup`
    shell lines: a shell that execs the last command of `a && b` (bash 5.2 does) makes submitit's local
    controller take its parent's pid for the job id."""

    def __init__(self, call: Callable[..., Any], visible: str | None, count: int | None) -> None:
        self.call, self.visible, self.count = call, visible, count

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():  # the mask would no longer apply
            raise RuntimeError("CUDA was initialised in the job before its CUDA_VISIBLE_DEVICES was set")
        if self.visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = self.visible
        if self.count:  # indices made up by `local_gpus`: CUDA silently drops those naming no device
            import torch

            from ofe.train.parallel import DeviceError

            seen = torch.cuda.device_count()
            if seen < self.count:
                raise DeviceError(f"launcher gpus_per_node: {self.count}, but the job sees {seen} GPU(s) with "
                                  f"CUDA_VISIBLE_DEVICES={self.visible!r}; lower gpus_per_node (or remove it "
                                  f"to use every GPU the launching process sees)")
        return self.call(*args, **kwargs)


class InspectJob(submitit.helpers.Checkpointable):
    """`ofe inspect` of one checkpoint of a checkpoint study, as a job: a requeued job measures again
    from the start (an inspection keeps no state between its steps)."""

    def __call__(self, ckpt: dict[str, Any], out_dir: str, settings: dict[str, Any], data: dict[str, Any],
                 quant: dict[str, Any], max_memory_gb: float | None = None) -> dict[str, Any]:
        from ofe.config import DataConfig, QuantConfig, build_section
        from ofe.pretrained.inspection import Settings, inspect

        return inspect(out_dir, model=ckpt["model"], revision=ckpt["revision"], step=ckpt["step"],
                       data=build_section(DataConfig, data, "data."),
                       settings=Settings(settings["batches"], settings["batch_size"], settings["context"],
                                         settings["threads"]),
                       quant=build_section(QuantConfig, quant, "quant."), max_memory_gb=max_memory_gb)


def quantise_in_process(run_dir: Path | str, quant: dict[str, Any]) -> dict[str, Any]:
    """int8 evaluation of a finished run (RUN/quant.parquet) on the device it trained on (the job's GPU),
    resuming from the rows a requeued job already measured; returns the number of rows."""
    from ofe.config import QuantConfig, build_section
    from ofe.runfolder import read_summary
    from ofe.track.live import log_quant
    from ofe.train.quantise import quantise_run

    df = quantise_run(run_dir, build_section(QuantConfig, quant, "quant."))
    # to the tracker run the training logged to, if any (ofe.track); a warning at worst, never a failure
    log_quant(run_dir, read_summary(Path(run_dir)), list(df.itertuples(index=False, name=None)))
    return {"rows": len(df)}
