"""The training loop: resume, step, log, checkpoint, divergence, summary.

Outputs in the run folder, each written atomically and fsynced:
- checkpoint.pt   model + optimiser + step + the metric rows so far + status + config hash (resume
                  point, then final model); checkpoint.prev.pt is the one before it
- metrics.parquet long rows (step, tokens, layer, site, metric, value); config + provenance in metadata
- summary.json    written last: with this config's hash, its presence means the run is finished
A run killed at any point and started again resumes from its last checkpoint and ends with the same
metrics as an uninterrupted run: batches and the LR are pure functions of the step. Outputs of another
config in the folder are moved aside first (`ofe.checkpoint`).
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ofe import checkpoint
from ofe.checkpoint import METRICS, SUMMARY
from ofe.config import RunConfig
from ofe.data import TokenData
from ofe.model import GPT
from ofe.optim import build_optimizer, lr_at
from ofe.probe import probe
from ofe.results import METRIC_SCHEMA, atomic_write_json, provenance, write_parquet

# A non-finite gradient norm with a finite loss skips the update (one bad batch, an overflow); this
# many in a row means the weights cannot recover, so the run is recorded as diverged.
MAX_CONSECUTIVE_SKIPS = 10


class _Interrupted(Exception):
    """Raised by the `stop_after` test hook to simulate a kill right after a checkpoint."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class Trainer:
    """One run's state; `run()` goes from wherever the checkpoint left it to the end.

    Data parallel: with WORLD_SIZE > 1 in the environment (set from submitit's tasks, see
    `ofe.launch.TrainJob`), every rank takes an equal slice of the same global batch and DDP averages
    the gradients, so the loss curve matches a 1-process run of that global batch. Rank 0 alone
    probes, validates, checkpoints and writes the run's files.
    """

    def __init__(self, cfg: RunConfig, out_dir: Path | str) -> None:
        self.cfg, self.out = cfg, Path(out_dir)
        tc = cfg.train
        torch.set_num_threads(tc.threads)
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if tc.batch_size % self.world:
            raise ValueError(f"train.batch_size={tc.batch_size} is not divisible by {self.world} processes")
        self.device = resolve_device(tc.device)
        cuda = self.device.type == "cuda"
        if cuda:  # TF32 matmuls: bf16-level precision is what autocast gives anyway
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.autocast_dtype = torch.bfloat16 if tc.precision == "bf16" or (tc.precision == "auto" and cuda) else None
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        self.data = TokenData(cfg.data_dir, cfg.model.context, tc.batch_size)
        if self.data.meta["vocab_size"] > cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                             f"{self.data.meta['vocab_size']}")
        torch.manual_seed(tc.seed)  # model init depends on the seed only
        self.model = GPT(cfg.model).to(self.device)  # the module the probe and checkpoints see
        self.forward = self.model
        if self.world > 1:
            self.forward = DistributedDataParallel(self.model)
        if tc.compile:
            self.forward = torch.compile(self.forward)
        self.opt = build_optimizer(self.model, cfg.optim)
        self.step, self.rows, self.seconds, self.status = 0, [], 0.0, "running"
        self.skipped_steps = self.consecutive_skips = 0
        self.tokens_per_step = tc.batch_size * cfg.model.context
        self.config_hash = cfg.config_hash()
        self._resume()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    # ---- checkpoints ----------------------------------------------------------------------------
    def _resume(self) -> None:
        # rank 0 alone cleans the folder and picks the checkpoint; the others wait, then load that one
        found = checkpoint.prepare_run_dir(self.out, self.config_hash, self.device) if not self.rank else None
        if self.world > 1:
            dist.barrier()
            if self.rank:
                found = checkpoint.load_checkpoint(self.out, self.device)
        if found is None:
            return
        name, ck = found
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.step, self.rows, self.seconds = ck["step"], [tuple(r) for r in ck["rows"]], ck["seconds"]
        self.status, self.skipped_steps, self.consecutive_skips = (
            ck["status"], ck["skipped_steps"], ck["consecutive_skips"])
        done = "; final metrics already logged" if self.status == "completed" else ""
        print(f"[ofe] resumed {self.out} at step {self.step} from {name}{done}", flush=True)

    def save_checkpoint(self) -> None:
        if self.rank:
            return
        checkpoint.save_checkpoint(
            {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
             "rows": self.rows, "seconds": self.seconds, "status": self.status,
             "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
             "config": self.cfg.to_dict(), "config_hash": self.config_hash},
            self.out,
        )

    # ---- logging --------------------------------------------------------------------------------
    def _add(self, layer: int, site: str, metric: str, value: float) -> None:
        self.rows.append((self.step, self.step * self.tokens_per_step, layer, site, metric, float(value)))

    def log_probe(self) -> float:
        """Metrics at every site on the fixed held-out batch; returns the max kurtosis (for progress)."""
        x = self.data.probe_batch(self.cfg.train.probe_batch_size).to(self.device)
        peak = 0.0
        with self._autocast():
            rows = probe(self.model, x)  # metrics themselves are computed in fp32
        for layer, site, metric, value in rows:
            self._add(layer, site, metric, value)
            if metric == "kurtosis":
                peak = max(peak, value) if math.isfinite(value) else value
        return peak

    @torch.no_grad()
    def log_val(self) -> float:
        self.model.eval()
        with self._autocast():
            losses = [self.model(x.to(self.device), y.to(self.device))[1].item()
                      for x, y in self.data.val_batches(self.cfg.train.eval_batches)]
        self.model.train()
        loss = sum(losses) / len(losses)
        self._add(-1, "val", "loss", loss)
        return loss

    # ---- the loop -------------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float, float]:
        """One optimiser step; returns (loss, grad norm, lr). A non-finite loss or gradient norm skips
        the update (every rank sees the same all-reduced values, so all skip together)."""
        tc = self.cfg.train
        lr = lr_at(self.step, tc.steps, self.cfg.optim)
        for group in self.opt.param_groups:
            group["lr"] = lr
        x, y = self.data.train_batch(tc.seed, self.step)
        if self.world > 1:  # this rank's equal slice of the global batch
            b = tc.batch_size // self.world
            x, y = x[self.rank * b:(self.rank + 1) * b], y[self.rank * b:(self.rank + 1) * b]
        with self._autocast():
            _, loss = self.forward(x.to(self.device), y.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.optim.clip if self.cfg.optim.clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).item()
        loss = loss.detach()
        if self.world > 1:  # the global batch's mean loss, identical on every rank
            dist.all_reduce(loss)
            loss /= self.world
        loss_value = loss.item()
        if math.isfinite(loss_value) and math.isfinite(grad_norm):
            self.opt.step()
        return loss_value, grad_norm, lr

    def run(self, stop_after: int | None = None) -> dict[str, Any]:
        tc = self.cfg.train
        t_start = time.perf_counter()
        seconds_before = self.seconds
        steps_at_start, peak = self.step, math.nan
        while self.step < tc.steps:
            if self.step % tc.log_every == 0 and not self.rank:
                peak = self.log_probe()
            if self.step % tc.eval_every == 0 and not self.rank:
                self.log_val()
            loss, grad_norm, lr = self.train_step()
            self._add(-1, "train", "loss", loss)
            self._add(-1, "train", "lr", lr)
            self._add(-1, "train", "grad_norm", grad_norm)
            if not math.isfinite(loss):  # a result, not a crash (PAPER.md section 2: no-norm diverges)
                self.status = "diverged"
                print(f"[ofe] step {self.step}: loss {loss}: diverged", flush=True)
                break
            if math.isfinite(grad_norm):
                self.consecutive_skips = 0
            else:
                self.skipped_steps += 1
                self.consecutive_skips += 1
                print(f"[ofe] step {self.step}: grad norm {grad_norm}: update skipped "
                      f"({self.consecutive_skips} in a row)", flush=True)
                if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                    self.status = "diverged"
                    print(f"[ofe] step {self.step}: {self.consecutive_skips} updates skipped in a row: "
                          f"diverged", flush=True)
                    break
            self.step += 1
            self.seconds = seconds_before + time.perf_counter() - t_start
            if (self.step % tc.log_every == 0 or self.step == tc.steps) and not self.rank:
                tok_s = (self.step - steps_at_start) * self.tokens_per_step / max(self.seconds - seconds_before, 1e-9)
                print(f"[ofe] step {self.step}/{tc.steps} loss {loss:.3f} lr {lr:.2e} "
                      f"max-kurtosis {peak:.2f} {tok_s:,.0f} tok/s", flush=True)
            if self.step % tc.checkpoint_every == 0 and self.step < tc.steps:
                self.save_checkpoint()
                if stop_after is not None and self.step >= stop_after:
                    raise _Interrupted(self.step)
        if self.status == "running":  # a checkpoint saved after this says so: a rerun never logs it twice
            self.status = "completed"
            if not self.rank:
                self.log_probe()
                self.log_val()
            self.save_checkpoint()
        self.seconds = seconds_before + time.perf_counter() - t_start
        return self.finish()

    def finish(self) -> dict[str, Any]:
        if self.world > 1:
            dist.destroy_process_group()
        if self.rank:  # rank 0 writes the run's files
            return {"status": self.status, "rank": self.rank, "steps_done": self.step}
        df = pd.DataFrame(self.rows, columns=METRIC_SCHEMA.names)
        meta = {"config": self.cfg.to_dict(), "config_hash": self.config_hash, "provenance": provenance(),
                "status": self.status}
        write_parquet(df, self.out / METRICS, METRIC_SCHEMA, meta)
        train_loss = df[(df.site == "train") & (df.metric == "loss")].value
        val_loss = df[(df.site == "val") & (df.metric == "loss")].value
        done = self.status == "completed"  # a diverged run has no final loss: its finite tail is not one
        kurt = df[df.metric == "kurtosis"]
        last_kurt = kurt[kurt.step == kurt.step.max()].value if len(kurt) else pd.Series(dtype=float)
        summary = {
            "status": self.status,
            "steps_done": self.step,
            "steps": self.cfg.train.steps,
            "skipped_steps": self.skipped_steps,
            # the largest kurtosis over sites and layers at the last probe (`ofe status` shows it)
            "max_kurtosis_last": float(last_kurt.max()) if len(last_kurt) else None,
            "final_train_loss": float(train_loss.tail(10).mean()) if done and len(train_loss) else None,
            "final_val_loss": float(val_loss.iloc[-1]) if done and len(val_loss) else None,
            "tokens": self.step * self.tokens_per_step,
            "wall_s": round(self.seconds, 3),
            "tokens_per_s": round(self.step * self.tokens_per_step / max(self.seconds, 1e-9), 1),
            "n_params": self.model.num_params(),
            "processes": self.world,
            "device": str(self.device),
            "precision": str(self.autocast_dtype or torch.float32).replace("torch.", ""),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_cuda_mb": (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                             if self.device.type == "cuda" else None),
            "config": self.cfg.to_dict(),
            "config_hash": self.config_hash,
            "provenance": provenance(),
        }
        atomic_write_json(self.out / SUMMARY, summary)  # last: marks the run finished
        return summary


def train(cfg: RunConfig, out_dir: Path | str, stop_after: int | None = None) -> dict[str, Any]:
    """Train one run into `out_dir`, resuming from its checkpoint if it has one of this config;
    idempotent once finished. A summary of another config is no answer: it is moved aside and the run
    trains (every rank reads the same summary, so all return or all train)."""
    out = Path(out_dir)
    summary = checkpoint.finished_summary(out, cfg.config_hash())
    if summary is not None and (out / METRICS).exists():  # else the final checkpoint rewrites both
        print(f"[ofe] {out}: already finished ({summary['status']}, this config); nothing to train", flush=True)
        return summary
    out.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, out).run(stop_after=stop_after)


def load_run_config(path: Path | str) -> RunConfig:
    return RunConfig.from_dict(json.loads(Path(path).read_text()))
