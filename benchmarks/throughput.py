"""Tokens/s of `ofe` training (probe + validation at their default cadence) vs a bare loop of the
same model, optimiser, batches and threads. Prints figures; target ratio 0.97 or better.

    .venv/bin/python benchmarks/throughput.py [--scale tiny] [--steps 200] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from ofe import presets
from ofe.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from ofe.data import TokenData, prepare
from ofe.model import GPT
from ofe.optim import build_optimizer, lr_at
from ofe.train import Trainer


def bare_loop(cfg: RunConfig) -> float:
    """The same steps with nothing else: no probe, no validation, no rows, no checkpoints."""
    torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    data = TokenData(cfg.data_dir, cfg.model.context, cfg.train.batch_size)
    model = GPT(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    t0 = time.perf_counter()
    for step in range(cfg.train.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.train.steps, cfg.optim)
        x, y = data.train_batch(cfg.train.seed, step)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip)
        opt.step()
    return time.perf_counter() - t0


def ofe_loop(cfg: RunConfig, out: Path) -> float:
    trainer = Trainer(cfg, out)
    t0 = time.perf_counter()
    trainer.run()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", default="tiny", choices=list(presets.SCALES))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ofe-bench-"))
    prepare(DataConfig(max_documents=400), tmp / "data")
    scale = presets.SCALES[args.scale]()
    defaults = TrainConfig()
    cfg = RunConfig(
        model=ModelConfig(**scale["model"], **presets.pre_ln()["model"]),
        optim=OptimConfig(lr=1e-2, betas=(0.9, 0.95)),
        train=replace(defaults, steps=args.steps, threads=args.threads, **scale["train"]),
        data_dir=str(tmp / "data"),
    )
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.model.context
    print(f"scale {args.scale}: {GPT(cfg.model).num_params() / 1e6:.2f}M params, {args.steps} steps, "
          f"{args.threads} thread(s); ofe logs every {defaults.log_every} steps, validates every "
          f"{defaults.eval_every} ({defaults.eval_batches} batches), checkpoints every {defaults.checkpoint_every}")
    bare, inst = [], []
    for r in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        bare.append(bare_loop(cfg))
        inst.append(ofe_loop(cfg, tmp / f"run{r}"))
        print(f"  repeat {r}: bare {tokens / bare[-1]:,.0f} tok/s   ofe {tokens / inst[-1]:,.0f} tok/s")
    b, i = min(bare), min(inst)
    print(f"best of {args.repeats}: bare {tokens / b:,.0f} tok/s, ofe {tokens / i:,.0f} tok/s, "
          f"ratio {b / i:.3f} (target >= 0.97)")
    assert math.isfinite(b / i)


if __name__ == "__main__":
    main()
