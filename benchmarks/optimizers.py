"""Step time of each optimiser relative to AdamW, on the `tiny` and `small` presets (and on CUDA when
available). Prints the optimiser step alone and the whole training step (forward + backward + step).

    .venv/bin/python benchmarks/optimizers.py [--scales tiny small] [--optimizers adamw muon] [--steps 30] [--threads 1]

The first optimiser named is the baseline of the "x" columns (AdamW unless --optimizers says otherwise).
"""

from __future__ import annotations

import argparse
import time

import torch

from ofe.config import ModelConfig
from ofe.core.model import GPT
from ofe.core.optim import OPTIMIZERS, make_optimizer, muon_param_groups, param_groups
from ofe.plan import presets


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(scale: str, name: str, steps: int, device: str) -> tuple[float, float]:
    """(seconds per optimiser step, seconds per training step), after 12 warm-up steps (past SOAP's
    first eigh and its first refresh)."""
    torch.manual_seed(0)
    p = presets.SCALES[scale]()
    cfg = ModelConfig(**p["model"], **presets.pre_ln()["model"])
    model = GPT(cfg).to(device)
    groups = muon_param_groups if name == "muon" else param_groups  # Muon takes the hidden matrices only
    opt = make_optimizer(name, groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                         precondition_frequency=10)
    batch = p["train"]["batch_size"]
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.context + 1), device=device)
    t_opt = t_all = 0.0
    for i in range(12 + steps):
        sync(device)
        t0 = time.perf_counter()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync(device)
        t1 = time.perf_counter()
        opt.step()
        sync(device)
        t2 = time.perf_counter()
        if i >= 12:
            t_opt += t2 - t1
            t_all += t2 - t0
    return t_opt / steps, t_all / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scales", nargs="+", default=["tiny", "small"])
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, {args.threads} thread(s), {args.steps} timed steps, precondition_frequency 10")
    print(f"{'scale':6} {'optimizer':18} {'opt step ms':>12} {'x first':>8} {'train step ms':>14} {'x first':>8}")
    for scale in args.scales:
        base = None
        for name in args.optimizers:
            t_opt, t_all = measure(scale, name, args.steps, device)
            base = base or (t_opt, t_all)
            print(f"{scale:6} {name:18} {1e3 * t_opt:12.2f} {t_opt / base[0]:8.2f} {1e3 * t_all:14.1f} "
                  f"{t_all / base[1]:8.2f}")


if __name__ == "__main__":
    main()
