"""A tiny run config, and the Trainer hook with which a test kills a run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ofe.config import RunConfig
    from ofe.train.trainer import Trainer


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


class Killed(Exception):
    """A test's kill of a training process, raised by `kill_after`'s hook."""


def kill_after(step: int) -> Callable[["Trainer"], None]:
    """An `on_checkpoint` hook of the Trainer that kills the run (raises `Killed`) right after its first
    checkpoint at or past `step`, on every rank."""
    def hook(trainer: "Trainer") -> None:
        if trainer.state.step >= step:
            raise Killed(trainer.state.step)

    return hook
