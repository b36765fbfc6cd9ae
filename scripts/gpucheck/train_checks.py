"""Checks 1-7: the device, CPU against GPU numerics, and the Trainer's paths (a run, resume, micro-batches,
FSDP, torch.compile) at a tiny shape (2 layers, d 128, context 64, batch 8 on the GPU), each a few seconds
of GPU time but the compile check (about a minute of compilation)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from gpucheck.common import (Context, Killed, Result, StepLog, autocast, compile_backend, instrument,
                             kill_after, losses, max_diff, step_tensors, sync_counter)
from ofe.config import ModelConfig
from ofe.core.model import GPT
from ofe.core.optim import OPTIMIZERS
from ofe.plan import presets
from ofe.train.trainer import Trainer, train

RESUME_TOL = 1e-3  # the bound on kill-and-resume against the uninterrupted run (losses)


def cuda_bf16_flash(ctx: Context, r: Result) -> None:
    """1. CUDA is usable, bf16 supported, and SDPA's flash kernel runs at the 130m head shape: alone, and
    inside the model's own forward and backward under bf16 autocast (restricted to flash, so an fp32 or
    otherwise flash-incompatible input raises instead of quietly taking another kernel). ~5 s."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = ModelConfig(**{**presets.resolve("130m", "pre_ln")["model"], "n_layer": 1})
    hd = shape.d_model // shape.n_head
    r.fig(torch=torch.__version__, cuda=torch.version.cuda, heads=shape.n_head, head_dim=hd, context=shape.context)
    if ctx.smoke:
        q = torch.randn(2, shape.n_head, shape.context, hd)
        r.fig(sdpa_cpu_finite=bool(F.scaled_dot_product_attention(q, q, q, is_causal=True).isfinite().all()))
        for what in ("cuda available", "bf16 supported", "flash kernel selected"):
            r.skip(what)
        return
    r.fig(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())),
          bf16=torch.cuda.is_bf16_supported())
    r.expect(r.figures["bf16"], "torch.cuda.is_bf16_supported() is False")
    q, k, v = (torch.randn(8, shape.n_head, shape.context, hd, device="cuda", dtype=torch.bfloat16) for _ in "qkv")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        r.fig(flash_sdpa="ok")
        model = GPT(shape).cuda()
        idx = torch.randint(0, shape.vocab_size, (8, shape.context + 1), device="cuda")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            r.fig(flash_in_model="ok")
        except RuntimeError as e:  # "No available kernel": the model's SDPA inputs do not suit flash
            r.fig(flash_in_model=str(e).splitlines()[0][:200])
            r.expect(False, "the model's attention cannot run on the flash kernel under bf16 autocast")


def cpu_vs_gpu(ctx: Context, r: Result) -> None:
    """2. The same seeded model on the same batch: CPU fp32 against the device in bf16 autocast (CPU bf16
    in smoke mode): step-0 loss within 1%, the probe's kurtosis within 5% at every site. ~3 s."""
    from ofe.core.data import TokenData
    from ofe.core.probe import collect, compute

    cfg = ctx.config("tiny")
    torch.manual_seed(0)
    cpu = GPT(cfg.model)
    dev = copy.deepcopy(cpu).to(ctx.device)
    data = TokenData(cfg.data_dir, cfg.model.context, cfg.train.batch_size)
    x, y = data.train_batch(0, 0)
    probe_x = data.probe_batch(cfg.train.probe_batch_size)
    with torch.no_grad():
        loss_cpu = cpu(x, y)[1].item()
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            loss_dev = dev(x.to(ctx.device), y.to(ctx.device))[1].item()
            acts = collect(dev, probe_x.to(ctx.device))  # as Trainer.log_probe: collect under autocast,
        rows_dev = compute(dev, acts)  # compute in fp32
        rows_cpu = compute(cpu, collect(cpu, probe_x))
    kurt = {(layer, site): v for layer, site, m, v in rows_cpu if m == "kurtosis"}
    rel = {f"{layer}/{site}": abs(v - kurt[(layer, site)]) / abs(kurt[(layer, site)])
           for layer, site, m, v in rows_dev if m == "kurtosis"}
    loss_rel = abs(loss_dev - loss_cpu) / abs(loss_cpu)
    r.fig(loss_cpu_fp32=loss_cpu, loss_bf16=loss_dev, loss_rel_diff=loss_rel,
          kurtosis_max_rel_diff=max(rel.values()), kurtosis_sites=len(rel))
    r.expect(loss_rel <= 0.01, f"step-0 loss differs by {loss_rel:.2%} (> 1%)")
    worst = max(rel, key=rel.get)
    r.expect(rel[worst] <= 0.05, f"kurtosis at {worst} differs by {rel[worst]:.2%} (> 5%)")


def tiny_run(ctx: Context, r: Result) -> None:
    """3. A 60-step run with probe (every 20), validation (every 30) and checkpoints (every 25) on device
    'auto': its summary says cuda / bfloat16 / completed; the host syncs of every step without a probe,
    validation or checkpoint are counted with torch.cuda.set_sync_debug_mode('warn'): at most 2. ~10 s."""
    cfg = ctx.config("tiny", device="auto" if ctx.gpu else "cpu", steps=60, log_every=20, eval_every=30,
                     checkpoint_every=25)
    tc, log = cfg.train, StepLog()
    trainer = Trainer(cfg, ctx.folder("run"))
    try:
        if ctx.gpu:
            with sync_counter() as syncs:
                instrument(trainer, log, syncs.count)
                summary = trainer.run()
        else:
            instrument(trainer, log)
            summary = trainer.run()
    finally:
        trainer.procs.shutdown()
    r.fig(status=summary["status"], device=summary["device"], device_type=summary["device_type"],
          precision=summary["precision"], gpu_name=summary.get("gpu_name"), steps_done=summary["steps_done"])
    r.expect(summary["status"] == "completed", f"status {summary['status']!r}, not 'completed'")
    r.expect(summary["device_type"] == ctx.device.type, f"the run trained on {summary['device']}, not {ctx.device.type}")
    r.expect(summary["precision"] == ctx.expected_precision(),
             f"precision {summary['precision']!r}, not {ctx.expected_precision()!r}")
    if ctx.smoke:
        r.skip("host syncs per step")
        return
    plain = [s for s in range(tc.steps - 1) if s % tc.log_every and s % tc.eval_every and (s + 1) % tc.checkpoint_every]
    per_step = {s: log.syncs[s + 1] - log.syncs[s] for s in plain}
    worst = max(per_step.values())
    r.fig(syncs_per_plain_step_max=worst, syncs_per_plain_step_min=min(per_step.values()),
          plain_steps=len(plain), syncs_total=log.syncs[tc.steps],
          sync_sources=syncs.where([(log.syncs[s], log.syncs[s + 1]) for s in plain]))
    r.expect(worst <= 2, f"{worst} host syncs in a step without probe, validation or checkpoint (> 2)")


def kill_and_resume(ctx: Context, r: Result) -> None:
    """4. For every optimiser: a run killed right after its step-10 checkpoint and resumed in a new Trainer
    ends with the uninterrupted run's losses within 1e-3, and after the resume every optimiser `step`
    tensor is on the CPU (on CUDA each would cost a host sync per parameter per step). ~20 s."""
    for name in OPTIMIZERS:
        cfg = ctx.config("tiny", optimizer=name)
        straight, resumed = ctx.folder(f"{name}-straight"), ctx.folder(f"{name}-resumed")
        train(cfg, straight)
        try:
            train(cfg, resumed, on_checkpoint=[kill_after(10)])
            r.expect(False, f"{name}: the kill_after(10) hook did not interrupt the run")
        except Killed:
            pass
        trainer = Trainer(cfg, resumed)
        try:
            steps = step_tensors(trainer.opt)
            on_device = sum(t.device.type != "cpu" for t in steps)
            r.fig(**{f"{name}.resumed_at": trainer.state.step, f"{name}.step_tensors": len(steps),
                     f"{name}.step_tensors_off_cpu": on_device})
            r.expect(trainer.state.step == 10, f"{name}: resumed at step {trainer.state.step}, not 10")
            r.expect(on_device == 0, f"{name}: {on_device} of {len(steps)} optimiser step tensors are not on the CPU")
            trainer.run()
        finally:
            trainer.procs.shutdown()
        diff = max_diff(losses(straight), losses(resumed))
        r.fig(**{f"{name}.loss_max_abs_diff": diff})
        r.expect(diff <= RESUME_TOL, f"{name}: resumed losses differ from the uninterrupted run's by {diff:.3g}")


def micro_batches(ctx: Context, r: Result) -> None:
    """5. Micro-batches of 2 against the whole batch of 8: the loss curves agree within bf16's tolerance
    (1%; fp32's 1e-5 in smoke mode). ~3 s."""
    tol = 1e-2 if ctx.gpu else 1e-5
    whole = ctx.folder("whole")
    split = ctx.folder("micro")
    train(ctx.config("tiny", steps=10), whole)
    train(ctx.config("tiny", steps=10, micro_batch_size=2), split)
    diff = max_diff(losses(whole), losses(split), relative=True)
    r.fig(loss_max_rel_diff=diff, tolerance=tol)
    r.expect(diff <= tol, f"micro-batched losses differ by {diff:.3g} relative (> {tol})")


def fsdp_one_rank(ctx: Context, r: Result) -> None:
    """6. train.parallel fsdp in one process: an uninterrupted run, a run killed after step 10 and resumed
    (losses within 1e-3), and its final sharded weights loaded into a plain GPT
    (ofe.runfolder.load_final_model) give the trainer's final validation loss. ~10 s."""
    from ofe.core.data import TokenData
    from ofe.runfolder import load_final_model

    cfg = ctx.config("tiny", parallel="fsdp")
    straight, resumed = ctx.folder("straight"), ctx.folder("resumed")
    train(cfg, straight)
    try:
        train(cfg, resumed, on_checkpoint=[kill_after(10)])
        r.expect(False, "the kill_after(10) hook did not interrupt the run")
    except Killed:
        pass
    summary = train(cfg, resumed)
    diff = max_diff(losses(straight), losses(resumed))
    r.fig(status=summary["status"], resume_loss_max_abs_diff=diff)
    r.expect(summary["status"] == "completed", f"status {summary['status']!r}")
    r.expect(diff <= RESUME_TOL, f"the resumed fsdp run's losses differ by {diff:.3g}")
    model = GPT(cfg.model)
    load_final_model(resumed, model, sharded=True)
    model.to(ctx.device).eval()
    data = TokenData(cfg.data_dir, cfg.model.context, cfg.train.batch_size)
    with torch.no_grad(), autocast(ctx):
        vals = [model(x.to(ctx.device), y.to(ctx.device))[1].item() for x, y in data.val_batches(cfg.train.eval_batches)]
    loaded, trained = sum(vals) / len(vals), summary["final_val_loss"]
    rel = abs(loaded - trained) / abs(trained)
    r.fig(val_loss_trainer=trained, val_loss_loaded=loaded, val_loss_rel_diff=rel)
    r.expect(rel <= 2e-3, f"the loaded final model's val loss differs from the trainer's by {rel:.3g} relative")


def compile_no_recompiles(ctx: Context, r: Result) -> None:
    """7. train.compile: true with the probe every 5 steps, validation every 8, checkpoints every 10: after
    a warm-up through step 10 (a probe, a validation and a checkpoint seen), Dynamo compiles no frame
    again (torch._dynamo.utils.counters['frames']['total'] counts every frame conversion, recompiles
    included). ~60 s, nearly all of it inductor's first compilation."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    warm = 11
    cfg = ctx.config("tiny", steps=24, log_every=5, eval_every=8, checkpoint_every=10, compile=True)
    torch._dynamo.reset()
    counters.clear()
    seen: dict[str, int] = {}
    with compile_backend(ctx) as backend:
        trainer = Trainer(cfg, ctx.folder("run"))
        try:
            measure = trainer._measure

            def snapshot() -> None:
                if trainer.state.step == warm:
                    seen.update(frames=counters["frames"]["total"], graphs=counters["stats"]["unique_graphs"])
                measure()

            trainer._measure = snapshot
            summary = trainer.run()
        finally:
            trainer.procs.shutdown()
    after = counters["frames"]["total"] - seen["frames"]
    r.fig(backend=backend, status=summary["status"], frames_compiled_warmup=seen["frames"],
          graphs_warmup=seen["graphs"], frames_compiled_after_warmup=after,
          graph_breaks=sum(counters["graph_break"].values()))
    r.expect(summary["status"] == "completed", f"status {summary['status']!r}")
    r.expect(after == 0, f"{after} frame compilations after warm-up (recompiles; TORCH_LOGS=recompiles says why)")
    r.expect(math.isfinite(summary["final_train_loss"] or math.nan), "non-finite final loss")
