"""Checks 8-12: the paper's shapes against the memory plan, throughput against a bare loop, the int8
evaluation on the GPU and a launched job. Costs are for one H100; each says its own."""

from __future__ import annotations

import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpucheck import common
from gpucheck.common import Context, Result, StepLog, compile_backend, instrument
from ofe.config import QuantConfig, RunConfig
from ofe.core.optim import OPTIMIZERS
from ofe.plan import memory
from ofe.train.trainer import Trainer, train

GIB = 2**30
# Dense bf16 peak TFLOP/s by GPU name (vendor data sheets, SXM parts); --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
NO_CHECKPOINT = 10**9  # a cadence beyond any run here: only the final checkpoint is written


def _train_measured(ctx: Context, cfg: RunConfig, out: Path) -> tuple[dict[str, Any], StepLog, int]:
    """Train `cfg` into `out`; returns its summary, step log and peak allocated bytes of the run alone."""
    ctx.free_memory()
    base = torch.cuda.memory_allocated() if ctx.gpu else 0
    trainer, log = Trainer(cfg, out), StepLog()
    try:
        instrument(trainer, log)
        summary = trainer.run()
    finally:
        trainer.procs.shutdown()
    peak = torch.cuda.max_memory_allocated() - base if ctx.gpu else 0
    del trainer
    shutil.rmtree(out, ignore_errors=True)  # paper-scale checkpoints are GBs
    ctx.free_memory()
    return summary, log, peak


def optimisers_130m(ctx: Context, r: Result) -> None:
    """8. Every optimiser at the 130m shape with vocabulary 52,000 (batch 128 x 128), 3 steps with the
    probe and validation: finite losses, seconds per step, peak allocated memory at most the plan's
    estimate (ofe.plan.memory.estimate, cuda=True). ~60 s: SOAP's and rotated_adafactor's first step
    eigendecomposes every matrix, and each run writes a final checkpoint of 1.5-4 GB."""
    for name in OPTIMIZERS:
        cfg = ctx.config("130m", optimizer=name, steps=3, log_every=NO_CHECKPOINT, eval_every=NO_CHECKPOINT,
                         eval_batches=1, checkpoint_every=NO_CHECKPOINT)
        est = memory.estimate(cfg.model, cfg.optim, cfg.train, 1, cuda=ctx.gpu)
        summary, log, peak = _train_measured(ctx, cfg, ctx.folder(name))
        per_step = statistics.median(list(log.durations().values())[1:] or [math.nan])  # after the first
        loss = summary["final_train_loss"]
        r.fig(**{f"{name}.s_per_step": per_step, f"{name}.final_loss": loss,
                 f"{name}.estimate_gib": est.total / GIB})
        r.expect(summary["status"] == "completed" and loss is not None and math.isfinite(loss),
                 f"{name}: status {summary['status']}, final loss {loss}")
        if ctx.smoke:
            continue
        r.fig(**{f"{name}.peak_gib": peak / GIB, f"{name}.peak_over_estimate": peak / est.total})
        r.expect(peak <= est.total, f"{name}: peak {peak / GIB:.2f} GiB above the plan's {est.total / GIB:.2f} GiB")
    if ctx.smoke:
        r.skip("peak GPU memory against the plan")


def memory_350m(ctx: Context, r: Result) -> None:
    """9. The 350m shape (24 x 1024, context 512, vocabulary 16,384) with AdamW and its preset batch of 64,
    3 steps: peak allocated memory between 0.8x and 1.0x of the plan before its reserve. ~30 s (a
    4 GB final checkpoint)."""
    cfg = ctx.config("350m", steps=3, log_every=NO_CHECKPOINT, eval_every=NO_CHECKPOINT, eval_batches=1,
                     checkpoint_every=NO_CHECKPOINT)
    est = memory.estimate(cfg.model, cfg.optim, cfg.train, 1, cuda=ctx.gpu)
    planned = est.total - est.reserve
    r.fig(batch=cfg.train.batch_size, estimate_gib=est.total / GIB, estimate_before_reserve_gib=planned / GIB)
    summary, _, peak = _train_measured(ctx, cfg, ctx.folder("run"))
    r.fig(status=summary["status"])
    r.expect(summary["status"] == "completed", f"status {summary['status']!r}")
    if ctx.smoke:
        r.skip("peak GPU memory in [0.8, 1.0] x the plan before its reserve")
        return
    ratio = peak / planned
    r.fig(peak_gib=peak / GIB, peak_over_plan=ratio)
    r.expect(0.8 <= ratio <= 1.0, f"peak / plan before reserve = {ratio:.3f}, outside [0.8, 1.0]")


# ---- 10. throughput ------------------------------------------------------------------------------

def throughput(ctx: Context, r: Result) -> None:
    """10. benchmarks/throughput.py's `measure` at the 130m shape (vocabulary 52,000, batch 128 x 128,
    the preset's probe, validation and checkpoint cadence), eager then compiled: the Trainer's tokens/s at
    least 0.9x the bare nanoGPT-style loop's on the same device and dtype, MFU = tokens/s x (6 N + 12 L T
    d) / peak. ~150 s: per mode a 10-step warm-up of each loop, then 120 timed steps of each (one 1.5 GB
    checkpoint in the Trainer's), and one inductor compilation of the 130m model. The smoke mode measures
    the `tiny` scale on CPU for 20 steps, with Dynamo's eager backend."""
    peak = ctx.peak_tflops or next((v for k, v in PEAK_TFLOPS.items()
                                    if ctx.gpu and k in torch.cuda.get_device_name()), None)
    for compiled in (False, True):
        mode = "compiled" if compiled else "eager"
        with compile_backend(ctx) as backend:
            got = common.benchmark().measure(
                scale="130m" if ctx.gpu else "tiny", device=str(ctx.device), compile=compiled,
                steps=120 if ctx.gpu else 20, repeats=1, warmup=10 if ctx.gpu else 2, threads=ctx.threads,
                peak_tflops=peak, workdir=ctx.folder(f"throughput-{mode}"), log=False)
        ctx.free_memory()
        r.fig(**{f"{mode}.{k}": got[k] for k in ("bare_tok_s", "trainer_tok_s", "ratio", "bare_mfu",
                                                 "trainer_mfu")}, **{f"{mode}.backend": backend})
        if ctx.gpu:
            r.expect(got["ratio"] >= 0.9, f"{mode}: the Trainer runs at {got['ratio']:.3f}x the bare loop (< 0.9)")
    r.fig(peak_tflops=peak, vocab=got["vocab"], flops_per_token=got["flops_per_token"])
    if ctx.smoke:
        r.skip("Trainer >= 0.9x the bare loop (CPU timings of toy shapes mean nothing)")


def quantise(ctx: Context, r: Result) -> None:
    """11. ofe.train.quantise.quantise_run on the device, timed, with the default quant settings (both simulated
    protocols, W8A8, 4 calibration and 16 evaluation batches of 128 x 128) and torchao's real int8 kernels
    (`torchao_dynamic`) on a 2-step run at the 130m shape; every row finite; and a forward of the torchao copy
    on the device calls one integer matmul (aten::_int_mm: cuBLAS on a GPU, by torchao 0.18's source, for
    inner dimensions that are multiples of 8, as here) per quantised layer, never run on a GPU before.
    ~30 s (on CPU this evaluation takes hours, issue 20 item 4)."""
    from ofe.core import torchao_int8
    from ofe.core.model import GPT
    from ofe.runfolder import load_final_model
    from ofe.train import quantise

    cfg = ctx.config("130m", steps=2, log_every=NO_CHECKPOINT, eval_every=NO_CHECKPOINT, eval_batches=1,
                     checkpoint_every=NO_CHECKPOINT)
    run = ctx.folder("run")
    train(cfg, run)
    ctx.free_memory()
    t0 = time.perf_counter()
    protocols = (*QuantConfig().protocols, "torchao_dynamic")
    df = quantise.quantise_run(run, QuantConfig(protocols=protocols))  # on the run's device (train.device)
    seconds = time.perf_counter() - t0
    finite = bool(np.isfinite(df[["ppl_fp", "ppl_q"]].to_numpy()).all())
    r.fig(seconds=seconds, rows=len(df), train_device=cfg.train.device, finite=finite,
          **{f"{p}.W{b}.ppl_q": q for p, b, q in zip(df.protocol, df.bits, df.ppl_q)})
    r.expect(len(df) == 3 and finite, f"{len(df)} rows, finite={finite}")

    model = GPT(cfg.model)
    load_final_model(run, model)
    q, layers = torchao_int8.quantised_copy(model.to(ctx.device).eval())
    idx = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.context), device=ctx.device)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        q(idx)
    int_mm = {e.key: e.count for e in prof.key_averages()}.get("aten::_int_mm", 0)
    r.fig(torchao_layers=layers, int_mm_calls=int_mm)
    r.expect(int_mm == layers, f"torchao's copy called aten::_int_mm {int_mm} times for {layers} quantised layers: "
             "it does not run integer matmuls here (see torchao.kernel.intmm.int_scaled_matmul for this device)")
    del q, model
    ctx.free_memory()


def launched(ctx: Context, r: Result) -> None:
    """12. ofe.cluster.launch.launch of a 4-step tiny run through submitit's local executor with one GPU (device
    'auto'): the job's summary says cuda. ~20 s (a fresh Python process imports torch and starts CUDA)."""
    from ofe.cluster.launch import launch

    launcher = {"cluster": "local", "poll_s": 0.5, "timeout_min": 5}
    if ctx.gpu:
        launcher["gpus_per_node"] = 1
    cfg = ctx.config("tiny", device="auto" if ctx.gpu else "cpu", steps=4, log_every=2, eval_every=2,
                     checkpoint_every=2)
    summary = launch(cfg, ctx.folder("run"), launcher)
    r.fig(status=summary["status"], device=summary["device"], device_type=summary["device_type"],
          precision=summary["precision"], gpu_name=summary.get("gpu_name"))
    r.expect(summary["status"] == "completed", f"status {summary['status']!r}")
    r.expect(summary["device_type"] == ctx.device.type,
             f"the launched job trained on {summary['device']}, not {ctx.device.type}")
