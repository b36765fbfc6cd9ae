"""Tokens/s of `ofe` training against a bare nanoGPT-style loop of the same model, optimiser, batches, LR
schedule and clipping, on the same device in the same dtype, in one run; with MFU.

    .venv/bin/python benchmarks/throughput.py [--device cpu|cuda] [--scale tiny] [--vocab 256] [--compile]
        [--steps 400] [--repeats 3] [--threads 1] [--peak-tflops 989]

Defaults: CUDA when available, at `130m` with the paper's CodeParrot vocabulary (52,000 tokens, whose LM
head is about 30% of the model's FLOPs there), else CPU at `tiny` with bytes (vocab 256). Both loops
compute in the dtype the Trainer resolves for the device: bf16 autocast on CUDA (`ofe.train.parallel.
mixed_precision_dtype`, the Trainer's own function), fp32 on CPU. The Trainer runs as in a real run: its
probe, validation, checkpoints and progress lines at the scale preset's cadence (TrainConfig's defaults
unless the preset sets them), its per-step host syncs (loss and gradient norm) and its final probe,
validation, checkpoint and files. The bare loop has none of that and never waits for the GPU. Target:
the Trainer at >= 0.9x the bare loop on a GPU, >= 0.97x on CPU.

MFU = tokens/s x FLOPs per token / peak. FLOPs per token = 6 N + 12 L T d: N counts the matrix parameters,
the tied embedding once (as the LM head) and the positions not at all; 12 L T d is attention's score and
value matmuls (PaLM's accounting, appendix B). `--peak-tflops`: 989 on CUDA (H100 SXM, dense bf16); on
CPU MFU is printed only when a peak is given.

Tokens are random (a local cache in the token format `ofe.core.data.TokenData` reads): throughput does not
depend on their values, and no tokenizer or dataset is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ofe.config import ModelConfig, OptimConfig, RunConfig, TrainConfig
from ofe.core.data import TokenData
from ofe.core.model import GPT
from ofe.core.optim import build_optimizer, lr_at
from ofe.plan import presets
from ofe.plan.memory import param_shapes
from ofe.train import parallel
from ofe.train.trainer import Trainer

# The paper's vocabularies: CodeParrot's tokenizer at 130m, Languini's at the larger scales; bytes on CPU.
DEFAULT_VOCAB = {"tiny": 256, "small": 256, "130m": 52_000, "350m": 16_384, "1.2b": 16_384, "7b": 16_384}
TARGET = {"cuda": 0.9, "cpu": 0.97}
H100_BF16_TFLOPS = 989.0


def write_random_tokens(out: Path, vocab: int, tokens: int = 1 << 20, seed: int = 0) -> Path:
    """A token cache of uniformly random ids below `vocab` (train and val splits, meta.json last)."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint8 if vocab <= 256 else np.uint32  # ofe.core.data.Tokenizer's choice
    rng = np.random.default_rng(seed)
    sizes = {"train": tokens, "val": max(tokens // 16, 4096)}
    for split, n in sizes.items():
        rng.integers(0, vocab, size=n, dtype=dtype).tofile(out / f"{split}.bin")
    meta = {"vocab_size": vocab, "dtype": np.dtype(dtype).name, "tokens": sizes, "source": "random"}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def run_config(scale: str, device: str, vocab: int, steps: int, compile: bool, data_dir: Path,
               threads: int = 1, block: str = "pre_ln", optimizer: str = "adamw") -> RunConfig:
    """The scale preset with `block` (its train settings, cadences included, over TrainConfig's defaults)."""
    p = presets.resolve(scale, block, optimizer=optimizer)
    return RunConfig(
        model=ModelConfig(**{**p["model"], "vocab_size": vocab}),
        optim=OptimConfig(name=optimizer, betas=(0.9, 0.95)),
        train=TrainConfig(**{**p.get("train", {}), "steps": steps, "threads": threads, "device": device,
                             "compile": compile}),
        data_dir=str(data_dir),
    )


def flops_per_token(cfg: ModelConfig) -> int:
    """6 N + 12 L T d (module docstring); N from `ofe.plan.memory.param_shapes`, the model's own shapes."""
    n = sum(math.prod(shape) for name, shape in param_shapes(cfg) if len(shape) == 2 and name != "wpe.weight")
    return 6 * n + 12 * cfg.n_layer * cfg.context * cfg.d_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(cfg: RunConfig) -> float:
    """Seconds for the config's training steps, nanoGPT-style: the batch copied from
    pinned memory without blocking, autocast as the Trainer's, forward, backward, clip, step; no probe,
    validation, rows, checkpoints, or reads of the loss or the gradient norm."""
    tc = cfg.train
    device = torch.device(tc.device)
    torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    data = TokenData(cfg.data_dir, cfg.model.context, tc.batch_size)
    model = GPT(cfg.model).to(device)
    opt = build_optimizer(model, cfg.optim)
    forward = torch.compile(model) if tc.compile else model
    dtype = parallel.mixed_precision_dtype(tc, device)
    cuda = device.type == "cuda"
    _sync(device)
    t0 = time.perf_counter()
    for step in range(tc.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc.steps, cfg.optim)
        x, y = data.train_batch(tc.seed, step)
        if cuda:
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            _, loss = forward(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip)
        opt.step()
    _sync(device)
    return time.perf_counter() - t0


def trainer_loop(cfg: RunConfig, out: Path) -> float:
    """Seconds of `Trainer.run()` (its construction excluded, as the bare loop's) in a fresh folder,
    which is removed afterwards (a 130m checkpoint is 1.5 GB). Raises unless the run completed."""
    trainer = Trainer(cfg, out)
    _sync(trainer.device)
    t0 = time.perf_counter()
    summary = trainer.run()
    _sync(trainer.device)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out)
    if summary["status"] != "completed" or summary["steps_done"] != cfg.train.steps:
        raise RuntimeError(f"the Trainer's run stopped at step {summary['steps_done']} of {cfg.train.steps} "
                           f"({summary['status']}): its time is not a throughput")
    return seconds


def measure(scale: str | None = None, device: str | None = None, compile: bool = False,
            vocab: int | None = None, steps: int = 400, repeats: int = 3, warmup: int = 10,
            threads: int = 1, peak_tflops: float | None = None, block: str = "pre_ln",
            optimizer: str = "adamw", workdir: Path | None = None, log: bool = True) -> dict[str, Any]:
    """The Trainer's tokens/s against the bare loop's, same model, device and dtype (module docstring).

    Defaults: device 'cuda' when available else 'cpu'; scale '130m' on CUDA, 'tiny' on CPU; vocab from
    DEFAULT_VOCAB (52,000 at 130m); peak 989 TFLOP/s on CUDA, none on CPU. First one untimed warm-up
    of each loop (`warmup` steps: torch.compile's compilation, the allocator, every Trainer path), then
    `repeats` timed pairs, interleaved so that drift in the machine's load hits both; the best of each.

    Returns: device, device_name, dtype, scale, vocab, compile, steps, repeats, n_params,
    tokens_per_step, flops_per_token, bare_tok_s, trainer_tok_s (best of the repeats), ratio
    (trainer_tok_s / bare_tok_s), target (0.9 on CUDA, 0.97 on CPU), peak_tflops, bare_mfu and
    trainer_mfu (fractions; None without a peak), seconds ({"bare": [...], "trainer": [...]}).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    scale = scale or ("130m" if dev.type == "cuda" else "tiny")
    vocab = vocab or DEFAULT_VOCAB[scale]
    peak_tflops = peak_tflops if peak_tflops is not None else (H100_BF16_TFLOPS if dev.type == "cuda" else None)
    work = Path(workdir or tempfile.mkdtemp(prefix="ofe-throughput-"))
    data = write_random_tokens(work / f"tokens-{vocab}", vocab)
    cfg = run_config(scale, device, vocab, steps, compile, data, threads, block, optimizer)
    warm = run_config(scale, device, vocab, warmup, compile, data, threads, block, optimizer)
    tokens = steps * cfg.train.batch_size * cfg.model.context
    fpt = flops_per_token(cfg.model)
    dtype = parallel.mixed_precision_dtype(cfg.train, dev) or torch.float32
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    n_params = sum(math.prod(shape) for _, shape in param_shapes(cfg.model))
    if log:
        tc = cfg.train
        print(f"{name}: {scale} {block}, vocab {vocab}, {n_params / 1e6:.1f}M params, "
              f"batch {tc.batch_size} x {cfg.model.context}, {str(dtype).replace('torch.', '')}, "
              f"compile={compile}, {steps} steps, {threads} thread(s); the Trainer probes every "
              f"{tc.log_every} steps, validates every {tc.eval_every} ({tc.eval_batches} batches), "
              f"checkpoints every {tc.checkpoint_every}", flush=True)
    bare_loop(warm)
    trainer_loop(warm, work / "warmup")
    seconds: dict[str, list[float]] = {"bare": [], "trainer": []}
    for r in range(repeats):
        seconds["bare"].append(bare_loop(cfg))
        seconds["trainer"].append(trainer_loop(cfg, work / f"run{r}"))
        if log:
            print(f"  repeat {r}: bare {tokens / seconds['bare'][-1]:,.0f} tok/s, "
                  f"ofe {tokens / seconds['trainer'][-1]:,.0f} tok/s", flush=True)
    bare_tok_s, trainer_tok_s = tokens / min(seconds["bare"]), tokens / min(seconds["trainer"])

    def mfu(tok_s: float) -> float | None:
        return tok_s * fpt / (peak_tflops * 1e12) if peak_tflops else None

    if workdir is None:
        shutil.rmtree(work)
    out = {"device": str(dev), "device_name": name, "dtype": str(dtype).replace("torch.", ""), "scale": scale,
           "vocab": vocab, "compile": compile, "steps": steps, "repeats": repeats,
           "n_params": n_params, "tokens_per_step": cfg.train.batch_size * cfg.model.context,
           "flops_per_token": fpt, "bare_tok_s": bare_tok_s, "trainer_tok_s": trainer_tok_s,
           "ratio": trainer_tok_s / bare_tok_s, "target": TARGET[dev.type], "peak_tflops": peak_tflops,
           "bare_mfu": mfu(bare_tok_s), "trainer_mfu": mfu(trainer_tok_s), "seconds": seconds}
    assert math.isfinite(out["ratio"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--scale", choices=list(presets.SCALES), default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--block", choices=list(presets.BLOCKS), default="pre_ln")
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()
    r = measure(args.scale, args.device, args.compile, args.vocab, args.steps, args.repeats, args.warmup,
                args.threads, args.peak_tflops, args.block, args.optimizer)
    line = (f"best of {r['repeats']}: bare {r['bare_tok_s']:,.0f} tok/s, ofe {r['trainer_tok_s']:,.0f} tok/s, "
            f"ratio {r['ratio']:.3f} (target >= {r['target']})")
    if r["peak_tflops"]:
        line += (f"; MFU bare {100 * r['bare_mfu']:.1f}%, ofe {100 * r['trainer_mfu']:.1f}% "
                 f"({r['flops_per_token'] / 1e6:.0f} MFLOP/token, peak {r['peak_tflops']:.0f} TFLOP/s)")
    print(line)


if __name__ == "__main__":
    main()
