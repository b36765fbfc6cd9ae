"""GPU throughput of a scale preset (default `130m`): tokens/s and MFU with bf16 autocast, fused SDPA
attention and optional torch.compile. Needs CUDA; prints figures.

    .venv/bin/python benchmarks/gpu.py [--scale 130m] [--batch 128] [--steps 30] [--compile] [--peak-tflops 989]

MFU = achieved model FLOP/s / peak. Model FLOPs per token = 6 N (N: the matrix parameters, the tied
embedding included as the LM head, positions excluded) + 12 L T d for attention (PaLM's accounting).
H100 SXM dense bf16 peak: 989 TFLOP/s.
"""

from __future__ import annotations

import argparse
import time

import torch

from ofe import presets
from ofe.config import ModelConfig, OptimConfig
from ofe.model import GPT
from ofe.optim import build_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", default="130m", choices=list(presets.SCALES))
    ap.add_argument("--block", default="pre_ln", choices=list(presets.BLOCKS))
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures the GPU path")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    p = presets.resolve(args.scale, args.block)  # the block at the scale's depth (OP's beta)
    cfg = ModelConfig(**p["model"])
    batch = args.batch or p["train"]["batch_size"]
    model = GPT(cfg).cuda()
    opt = build_optimizer(model, OptimConfig(lr=1e-4))
    step_fn = torch.compile(model) if args.compile else model
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.context + 1), device="cuda")
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("wpe"))
    flops_per_token = 6 * n_matmul + 12 * cfg.n_layer * cfg.context * cfg.d_model

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = step_fn(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(5):  # warm-up (and compilation)
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tok_s = batch * cfg.context / dt
    mfu = tok_s * flops_per_token / (args.peak_tflops * 1e12)
    print(f"{torch.cuda.get_device_name()}: {args.scale} {args.block}, {model.num_params() / 1e6:.0f}M params, "
          f"batch {batch} x {cfg.context}, compile={args.compile}: {dt * 1e3:.1f} ms/step, {tok_s:,.0f} tok/s, "
          f"MFU {100 * mfu:.1f}% (peak {args.peak_tflops:.0f} TFLOP/s), "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
