"""The training loop: resume, step, log, checkpoint, divergence, summary.

Outputs in the run folder, each written atomically and fsynced:
- checkpoint.pt   model + optimiser + step + the metric rows so far + status + config hash (resume
                  point, then final model); checkpoint.prev.pt is the one before it. An fsdp run
                  writes the sharded folders checkpoint.dcp and checkpoint.prev.dcp instead (`ofe.train.dcp`)
- metrics.parquet long rows (step, tokens, layer, site, metric, value); config + provenance in metadata
- summary.json    written last: with this run's identity (`ofe.config.run_identity`: the config hash
                  with the resolved device type and dtype), its presence means the run is finished
A run killed at any point and started again resumes from its last checkpoint and ends with the same
metrics as an uninterrupted run: batches and the LR are pure functions of the step. Outputs of another
config in the folder are moved aside first (`ofe.train.checkpoint`).
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
import torch
import torch.distributed as dist

from ofe.config import RunConfig, TrainConfig, check_micro_batch, run_identity
from ofe.core.data import TokenData
from ofe.core.model import GPT
from ofe.core.optim import build_optimizer, lr_at
from ofe.core.probe import collect, compute
from ofe.io import METRIC_SCHEMA, provenance, write_parquet
from ofe.runfolder import METRICS, finished_summary, write_summary
from ofe.plan import costs
from ofe.track import live as tracking
from ofe.train import checkpoint, dcp, parallel
from ofe.train.state import RunState

# A non-finite gradient norm with a finite loss skips the update (one bad batch, an overflow); this
# many in a row means the weights cannot recover, so the run is recorded as diverged.
MAX_CONSECUTIVE_SKIPS = 10

# Called with the trainer on every rank after each checkpoint is written (tests kill a run there by raising).
CheckpointHook = Callable[["Trainer"], None]


class Trainer:
    """One run's state; `run()` goes from wherever the checkpoint left it to the end.

    Data parallel: with WORLD_SIZE > 1 in the environment (set from submitit's tasks, see
    `ofe.cluster.jobs.TrainJob`), every rank takes an equal slice of the same global batch and DDP averages
    the gradients, so the loss curve matches a 1-process run of that global batch. Rank 0 alone
    probes, validates, checkpoints and writes the run's files. With `train.parallel: fsdp` the model is
    sharded (`ofe.train.parallel.wrap`): every rank then runs the probe's and validation's forward passes
    (they gather the weights), every rank writes its shards of each checkpoint (`ofe.train.dcp`), and rank 0
    still alone computes metrics and writes the run's files.
    Each rank's slice is split into micro-batches of `train.micro_batch_size` whose gradients add up
    to the slice's (gradient accumulation; under ddp only the last one communicates, under fsdp each
    reduce-scatters, so that no rank holds unsharded gradients); validation runs in the same micro-batches.
    bf16 is autocast on every path: weights, residual stream and probed activations stay fp32.
    Everything a checkpoint saves and a resume restores is `self.state` (`ofe.train.state.RunState`).
    """

    def __init__(self, cfg: RunConfig, out_dir: Path | str, on_checkpoint: Iterable[CheckpointHook] = ()) -> None:
        self.cfg, self.out = cfg, Path(out_dir)
        self.on_checkpoint = list(on_checkpoint)
        # the progress line's clock, restarted by run(): when it started, the seconds trained and the step
        # then, and the last probe's largest kurtosis
        self._t_start, self._seconds_before, self._steps_at_start, self._peak = time.perf_counter(), 0.0, 0, math.nan
        tc = cfg.train
        torch.set_num_threads(tc.threads)
        self.device, self.dtype = resolve_runtime(tc)
        # a collective waits for rank 0 reading or writing a whole checkpoint (ofe.plan.costs)
        self.procs = parallel.start(tc.parallel, self.device,
                                    costs.collective_timeout_s(cfg.model, cfg.optim, self.device.type == "cuda"))
        try:
            self._build(cfg)
        except BaseException:
            self.procs.shutdown()
            raise

    def _build(self, cfg: RunConfig) -> None:
        tc = cfg.train
        self.rank, self.world = self.procs.rank, self.procs.world
        check_micro_batch(tc, self.world)  # the number of processes is known only now: check again
        self.sharded = tc.parallel == "fsdp"
        parallel.ieee_fp32_matmuls()  # never TF32: the metrics' and optimisers' fp32 matmuls stay exact
        self.data = TokenData(cfg.data_dir, cfg.model.context, tc.batch_size)
        if self.data.meta["vocab_size"] > cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                             f"{self.data.meta['vocab_size']}")
        torch.manual_seed(tc.seed)  # model init depends on the seed only
        self.model = GPT(cfg.model).to(self.device)  # the module the probe and checkpoints see
        self.wrapped = parallel.wrap(self.model, tc, self.device, self.procs)  # fsdp: the model itself
        self.forward = torch.compile(self.wrapped) if tc.compile else self.wrapped
        self.opt = build_optimizer(self.model, cfg.optim)  # after sharding: it holds the shards
        self.tokens_per_step = tc.batch_size * cfg.model.context
        self.runtime = parallel.runtime(self.device, self.dtype)
        self.config_hash = identity(cfg, self.device, self.dtype)  # not cfg.config_hash(): see run_identity
        self.state = self._resume()
        # rank 0 mirrors its rows to W&B / MLflow if the run folder asks (ofe.track): a side channel, off the
        # training thread; the run's own files stay the record
        self.tracker = tracking.for_run(self.out, cfg.to_dict(), self.config_hash, self.rank)

    @property
    def collects(self) -> bool:
        """Whether this rank runs the probe's and validation's forward passes (all do under FSDP)."""
        return not self.rank or self.sharded

    def _autocast(self) -> torch.autocast:
        # bf16: autocast around forward and backward on every path (ddp and fsdp alike, ofe.train.parallel)
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    # ---- checkpoints ----------------------------------------------------------------------------
    def _resume(self) -> RunState:
        """Load model and optimiser from the run's checkpoint, if it has one; returns the run's state."""
        # rank 0 alone cleans the folder and picks the checkpoint; the others wait, then load that one
        # on the CPU: load_state_dict copies the weights and moments to the parameters' device and
        # leaves the optimisers' `step` counters on the CPU, where reading them costs no device sync
        found = checkpoint.prepare_run_dir(self.out, self.config_hash, self.sharded) if not self.rank else None
        if self.world > 1:
            chosen = [found[0] if found else None]
            dist.broadcast_object_list(chosen, src=0)  # the name, not a guess from the folder
            if self.rank and chosen[0] is not None:
                found = chosen[0], checkpoint.load_checkpoint(self.out, self.sharded)[1]
        if found is None:
            return RunState()
        name, ck = found
        if self.sharded:
            dcp.load(self.model, self.opt, self.out / name)  # every rank its shards
        else:
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
        state = RunState.from_checkpoint(ck)
        done = "; final metrics already logged" if state.status == "completed" else ""
        print(f"[ofe] resumed {self.out} at step {state.step} from {name}{done}", flush=True)
        return state

    def save_checkpoint(self) -> None:
        """Write the run's state, model and optimiser (rank 0; under fsdp every rank its shards), then call
        the `on_checkpoint` hooks on every rank."""
        state = {**self.state.to_dict(), "config": self.cfg.to_dict(), "config_hash": self.config_hash}
        if self.sharded:  # every rank writes its shards
            dcp.save(state, self.model, self.opt, self.out, self.procs)
        elif not self.rank:
            checkpoint.save_checkpoint(
                {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), **state}, self.out)
        for hook in self.on_checkpoint:
            hook(self)

    # ---- logging --------------------------------------------------------------------------------
    def _add(self, layer: int, site: str, metric: str, value: float) -> None:
        step = self.state.step
        self.state.rows.append((step, step * self.tokens_per_step, layer, site, metric, float(value)))

    def log_probe(self) -> float:
        """Metrics at every site on the fixed held-out batch; returns the max kurtosis (for progress).
        Every rank that `collects` runs the forward pass; rank 0 alone computes and logs."""
        x = parallel.to_device(self.data.probe_batch(self.cfg.train.probe_batch_size), self.device)
        peak = 0.0
        with self._autocast():
            activations = collect(self.model, x)
        if self.rank:
            return peak
        for layer, site, metric, value in compute(self.model, activations):  # in fp32
            self._add(layer, site, metric, value)
            if metric == "kurtosis":
                peak = max(peak, value) if math.isfinite(value) else value
        return peak

    @torch.no_grad()
    def log_val(self) -> float:
        """The mean loss over `eval_batches` held-out batches of batch_size sequences, each batch in
        micro-batches of the training step's size (train.micro_batch_size, else a process's share of
        the batch), so validation never needs more activation memory than a step's forward. The chunks
        are equal, so the mean of their mean losses is the whole batch's."""
        tc = self.cfg.train
        m = tc.micro_batch_size or tc.batch_size // self.world
        self.model.eval()
        losses = []
        with self._autocast():
            for x, y in self.data.val_batches(tc.eval_batches):
                for i in range(0, len(x), m):
                    xi, yi = (parallel.to_device(t[i:i + m], self.device) for t in (x, y))
                    losses.append(self.model(xi, yi)[1])
        self.model.train()
        loss = torch.stack(losses).double().mean().item()  # one host sync for all of them
        if not self.rank:
            self._add(-1, "val", "loss", loss)
        return loss

    # ---- the loop -------------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float, float]:
        """One optimiser step; returns (loss, grad norm, lr). A non-finite loss or gradient norm skips
        the update (every rank sees the same all-reduced values, so all skip together)."""
        tc = self.cfg.train
        lr = lr_at(self.state.step, tc.steps, self.cfg.optim)
        for group in self.opt.param_groups:
            group["lr"] = lr
        x, y = self.data.train_batch(tc.seed, self.state.step)
        b = tc.batch_size // self.world  # this rank's equal slice of the global batch
        x, y = (parallel.to_device(t[self.rank * b:(self.rank + 1) * b], self.device) for t in (x, y))
        m = tc.micro_batch_size or b
        k = b // m
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for i in range(k):
            # every micro-batch has m x context tokens, so the mean of their mean losses is the slice's
            # mean, and the sum of their gradients / k is its gradient; under ddp only the last one
            # communicates, fsdp reduce-scatters each (ofe.train.parallel.grad_sync)
            with parallel.grad_sync(self.wrapped, sync=i == k - 1):
                with self._autocast():
                    _, loss = self.forward(x[i * m:(i + 1) * m], y[i * m:(i + 1) * m])
                (loss / k if k > 1 else loss).backward()
            total += loss.detach()
        clip = self.cfg.optim.clip if self.cfg.optim.clip is not None else math.inf
        # under FSDP the gradients are DTensor shards: the norm is the global one, the same on every rank
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).item())
        # the global batch's mean loss, identical on every rank
        loss_value = parallel.all_mean(total / k if k > 1 else total, self.procs).item()
        if math.isfinite(loss_value) and math.isfinite(grad_norm):
            self.opt.step()
        return loss_value, grad_norm, lr

    # ---- the loop, top to bottom: measure, step, record, report, checkpoint; then complete --------
    def run(self) -> dict[str, Any]:
        """Train from the current step (0, or where `_resume` left off) to `train.steps`, then write the
        run's files."""
        tc, state = self.cfg.train, self.state
        self._start_clock()
        while state.step < tc.steps:
            self._measure()
            loss, grad_norm, lr = self.train_step()
            if not self._record(loss, grad_norm, lr):
                break
            state.step += 1
            self.tracker.rows(state.rows)  # every row up to the step just done: queued, never waited on
            self._report(loss, lr)
            if state.step % tc.checkpoint_every == 0 and state.step < tc.steps:  # the last one is _complete's
                self.save_checkpoint()
        self._complete()
        self._update_clock()
        return self.finish()

    def _start_clock(self) -> None:
        self._t_start, self._seconds_before = time.perf_counter(), self.state.seconds
        self._steps_at_start, self._peak = self.state.step, math.nan

    def _update_clock(self) -> None:
        self.state.seconds = self._seconds_before + time.perf_counter() - self._t_start

    def _measure(self) -> None:
        """The probe and the validation due before this step's update."""
        tc = self.cfg.train
        if self.state.step % tc.log_every == 0 and self.collects:
            self._peak = self.log_probe()
        if self.state.step % tc.eval_every == 0 and self.collects:
            self.log_val()

    def _record(self, loss: float, grad_norm: float, lr: float) -> bool:
        """Log the step's loss, LR and gradient norm; False when training must stop (diverged)."""
        self._add(-1, "train", "loss", loss)
        self._add(-1, "train", "lr", lr)
        self._add(-1, "train", "grad_norm", grad_norm)
        state = self.state
        if not math.isfinite(loss):  # a result, not a crash (docs/science.md section 2: no-norm diverges)
            state.status = "diverged"
            print(f"[ofe] step {state.step}: loss {loss}: diverged", flush=True)
            return False
        if math.isfinite(grad_norm):
            state.consecutive_skips = 0
            return True
        state.skipped_steps += 1
        state.consecutive_skips += 1
        print(f"[ofe] step {state.step}: grad norm {grad_norm}: update skipped "
              f"({state.consecutive_skips} in a row)", flush=True)
        if state.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            state.status = "diverged"
            print(f"[ofe] step {state.step}: {state.consecutive_skips} updates skipped in a row: diverged",
                  flush=True)
            return False
        return True

    def _report(self, loss: float, lr: float) -> None:
        """The progress line, every `log_every` steps and at the end (rank 0)."""
        self._update_clock()
        tc, step = self.cfg.train, self.state.step
        if (step % tc.log_every == 0 or step == tc.steps) and not self.rank:
            elapsed = max(self.state.seconds - self._seconds_before, 1e-9)
            tok_s = (step - self._steps_at_start) * self.tokens_per_step / elapsed
            print(f"[ofe] step {step}/{tc.steps} loss {loss:.3f} lr {lr:.2e} "
                  f"max-kurtosis {self._peak:.2f} {tok_s:,.0f} tok/s", flush=True)

    def _complete(self) -> None:
        """A run that reached its last step: the final probe and validation, then the final checkpoint,
        which records the status, so a rerun never logs the final rows twice."""
        if self.state.status != "running":
            return
        self.state.status = "completed"
        if self.collects:
            self.log_probe()
            self.log_val()
        self.save_checkpoint()

    def finish(self) -> dict[str, Any]:
        """Leave the process group; rank 0 writes metrics.parquet, then summary.json (the run's mark)."""
        n_params = self.model.num_params()  # global sizes, even of shards
        self.procs.shutdown()
        if self.rank:  # rank 0 writes the run's files
            return {"status": self.state.status, "rank": self.rank, "steps_done": self.state.step}
        df = pd.DataFrame(self.state.rows, columns=METRIC_SCHEMA.names)
        meta = {"config": self.cfg.to_dict(), "config_hash": self.config_hash, "provenance": provenance(),
                "status": self.state.status, "runtime": self.runtime}
        write_parquet(df, self.out / METRICS, METRIC_SCHEMA, meta)
        summary = self._summary(df, n_params)
        write_summary(self.out, summary)  # last: marks the run finished
        self.tracker.finish(self.state.rows, summary)  # the final rows and summary; waits (bounded) for the tracker
        return summary

    def _summary(self, df: pd.DataFrame, n_params: int) -> dict[str, Any]:
        """summary.json: status, final losses, the last probe's largest kurtosis, speed, memory, config."""
        train_loss = df[(df.site == "train") & (df.metric == "loss")].value
        val_loss = df[(df.site == "val") & (df.metric == "loss")].value
        state = self.state
        done = state.status == "completed"  # a diverged run has no final loss: its finite tail is not one
        kurt = df[df.metric == "kurtosis"]
        last_kurt = kurt[kurt.step == kurt.step.max()].value if len(kurt) else pd.Series(dtype=float)
        return {
            "status": state.status,
            "steps_done": state.step,
            "steps": self.cfg.train.steps,
            "skipped_steps": state.skipped_steps,
            # the largest kurtosis over sites and layers at the last probe (`ofe status` shows it)
            "max_kurtosis_last": float(last_kurt.max()) if len(last_kurt) else None,
            "final_train_loss": float(train_loss.tail(10).mean()) if done and len(train_loss) else None,
            "final_val_loss": float(val_loss.iloc[-1]) if done and len(val_loss) else None,
            "tokens": state.step * self.tokens_per_step,
            "wall_s": round(state.seconds, 3),
            "tokens_per_s": round(state.step * self.tokens_per_step / max(state.seconds, 1e-9), 1),
            "n_params": n_params,
            "processes": self.world,
            "device": self.runtime["device"],
            "device_type": self.runtime["device_type"],
            "precision": self.runtime["dtype"],
            "gpu_name": self.runtime["gpu_name"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_cuda_mb": (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                             if self.device.type == "cuda" else None),
            "config": self.cfg.to_dict(),
            "config_hash": self.config_hash,
            "provenance": provenance(),
        }


def train(cfg: RunConfig, out_dir: Path | str, on_checkpoint: Iterable[CheckpointHook] = ()) -> dict[str, Any]:
    """Train one run into `out_dir`, resuming from its checkpoint if it has one of this run's identity;
    idempotent once finished. A summary of another config, or of this config on another device type or
    dtype, is no answer: it is moved aside and the run trains (every rank reads the same summary, so all
    return or all train). The device is resolved first, so a job that cannot use its GPUs fails here.
    `on_checkpoint`: hooks the Trainer calls after each checkpoint."""
    out = Path(out_dir)
    device, dtype = resolve_runtime(cfg.train)
    summary = finished_summary(out, identity(cfg, device, dtype))
    if summary is not None and (out / METRICS).exists():  # else the final checkpoint rewrites both
        print(f"[ofe] {out}: already finished ({summary['status']}, this config on {device.type} in "
              f"{str(dtype).removeprefix('torch.')}); nothing to train", flush=True)
        return summary
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, out, on_checkpoint=on_checkpoint)
    try:
        return trainer.run()
    finally:  # also after an exception: a process group this run made must not outlive it
        trainer.procs.shutdown()
        trainer.tracker.close()  # a failed run's tracker run ends as failed (a no-op after finish)


def resolve_runtime(tc: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """The device (`ofe.train.parallel.resolve_device`, this process's LOCAL_RANK) and compute dtype a run
    trains with in this process."""
    device = parallel.resolve_device(tc.device, parallel.local_rank())
    return device, parallel.mixed_precision_dtype(tc, device) or torch.float32


def identity(cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> str:
    """The run's identity (`ofe.config.run_identity`) when trained on `device` in `dtype`."""
    return run_identity(cfg.to_dict(), device.type, str(dtype).replace("torch.", ""))


def load_run_config(path: Path | str) -> RunConfig:
    return RunConfig.from_dict(json.loads(Path(path).read_text()))
