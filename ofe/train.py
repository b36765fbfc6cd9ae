"""The training loop: resume, step, log, checkpoint, divergence, summary.

Outputs in the run folder, each written atomically:
- checkpoint.pt   model + optimiser + step + the metric rows so far (resume point, then final model)
- metrics.parquet long rows (step, tokens, layer, site, metric, value); config + provenance in metadata
- summary.json    written last: its presence means the run is finished (completed or diverged)
A run killed at any point and started again resumes from its last checkpoint and ends with the same
metrics as an uninterrupted run: batches and the LR are pure functions of the step.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ofe.config import RunConfig
from ofe.data import TokenData
from ofe.model import GPT
from ofe.optim import build_optimizer, lr_at
from ofe.probe import probe
from ofe.results import METRIC_SCHEMA, atomic_torch_save, atomic_write_json, provenance, write_parquet

CHECKPOINT, METRICS, SUMMARY = "checkpoint.pt", "metrics.parquet", "summary.json"


class _Interrupted(Exception):
    """Raised by the `stop_after` test hook to simulate a kill right after a checkpoint."""


class Trainer:
    """One run's state; `run()` goes from wherever the checkpoint left it to the end."""

    def __init__(self, cfg: RunConfig, out_dir: Path | str) -> None:
        self.cfg, self.out = cfg, Path(out_dir)
        torch.set_num_threads(cfg.train.threads)
        self.data = TokenData(cfg.data_dir, cfg.model.context, cfg.train.batch_size)
        if self.data.meta["vocab_size"] > cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                             f"{self.data.meta['vocab_size']}")
        torch.manual_seed(cfg.train.seed)  # model init depends on the seed only
        self.model = GPT(cfg.model).to(cfg.train.device)
        self.opt = build_optimizer(self.model, cfg.optim)
        self.step, self.rows, self.seconds, self.status = 0, [], 0.0, "running"
        self.tokens_per_step = cfg.train.batch_size * cfg.model.context
        self._resume()

    # ---- checkpoints ----------------------------------------------------------------------------
    def _resume(self) -> None:
        path = self.out / CHECKPOINT
        if not path.exists():
            return
        ck = torch.load(path, map_location=self.cfg.train.device, weights_only=True)
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.step, self.rows, self.seconds = ck["step"], [tuple(r) for r in ck["rows"]], ck["seconds"]
        print(f"[ofe] resumed {self.out} at step {self.step}", flush=True)

    def save_checkpoint(self) -> None:
        atomic_torch_save(
            {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
             "rows": self.rows, "seconds": self.seconds, "config": self.cfg.to_dict()},
            self.out / CHECKPOINT,
        )

    # ---- logging --------------------------------------------------------------------------------
    def _add(self, layer: int, site: str, metric: str, value: float) -> None:
        self.rows.append((self.step, self.step * self.tokens_per_step, layer, site, metric, float(value)))

    def log_probe(self) -> float:
        """Metrics at every site on the fixed held-out batch; returns the max kurtosis (for progress)."""
        x = self.data.probe_batch(self.cfg.train.probe_batch_size).to(self.cfg.train.device)
        peak = 0.0
        for layer, site, metric, value in probe(self.model, x):
            self._add(layer, site, metric, value)
            if metric == "kurtosis":
                peak = max(peak, value) if math.isfinite(value) else value
        return peak

    @torch.no_grad()
    def log_val(self) -> float:
        self.model.eval()
        losses = [self.model(x.to(self.cfg.train.device), y.to(self.cfg.train.device))[1].item()
                  for x, y in self.data.val_batches(self.cfg.train.eval_batches)]
        self.model.train()
        loss = sum(losses) / len(losses)
        self._add(-1, "val", "loss", loss)
        return loss

    # ---- the loop -------------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float, float]:
        """One optimiser step; returns (loss, grad norm, lr). A non-finite loss skips the update."""
        tc, dev = self.cfg.train, self.cfg.train.device
        lr = lr_at(self.step, tc.steps, self.cfg.optim)
        for group in self.opt.param_groups:
            group["lr"] = lr
        x, y = self.data.train_batch(tc.seed, self.step)
        _, loss = self.model(x.to(dev), y.to(dev))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.optim.clip if self.cfg.optim.clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).item()
        loss_value = loss.item()
        if math.isfinite(loss_value):
            self.opt.step()
        return loss_value, grad_norm, lr

    def run(self, stop_after: int | None = None) -> dict[str, Any]:
        tc = self.cfg.train
        t_start = time.perf_counter()
        seconds_before = self.seconds
        steps_at_start, peak = self.step, math.nan
        while self.step < tc.steps:
            if self.step % tc.log_every == 0:
                peak = self.log_probe()
            if self.step % tc.eval_every == 0:
                self.log_val()
            loss, grad_norm, lr = self.train_step()
            self._add(-1, "train", "loss", loss)
            self._add(-1, "train", "lr", lr)
            self._add(-1, "train", "grad_norm", grad_norm)
            if not math.isfinite(loss):  # a result, not a crash (PAPER.md section 2: no-norm diverges)
                self.status = "diverged"
                print(f"[ofe] step {self.step}: loss {loss}: diverged", flush=True)
                break
            self.step += 1
            self.seconds = seconds_before + time.perf_counter() - t_start
            if self.step % tc.log_every == 0 or self.step == tc.steps:
                tok_s = (self.step - steps_at_start) * self.tokens_per_step / max(self.seconds - seconds_before, 1e-9)
                print(f"[ofe] step {self.step}/{tc.steps} loss {loss:.3f} lr {lr:.2e} "
                      f"max-kurtosis {peak:.2f} {tok_s:,.0f} tok/s", flush=True)
            if self.step % tc.checkpoint_every == 0 and self.step < tc.steps:
                self.save_checkpoint()
                if stop_after is not None and self.step >= stop_after:
                    raise _Interrupted(self.step)
        if self.status == "running":
            self.status = "completed"
            self.log_probe()
            self.log_val()
            self.save_checkpoint()
        self.seconds = seconds_before + time.perf_counter() - t_start
        return self.finish()

    def finish(self) -> dict[str, Any]:
        df = pd.DataFrame(self.rows, columns=METRIC_SCHEMA.names)
        meta = {"config": self.cfg.to_dict(), "provenance": provenance(), "status": self.status}
        write_parquet(df, self.out / METRICS, METRIC_SCHEMA, meta)
        train_loss = df[(df.site == "train") & (df.metric == "loss")].value
        val_loss = df[(df.site == "val") & (df.metric == "loss")].value
        summary = {
            "status": self.status,
            "steps_done": self.step,
            "steps": self.cfg.train.steps,
            "final_train_loss": float(train_loss.tail(10).mean()) if len(train_loss) else None,
            "final_val_loss": float(val_loss.iloc[-1]) if len(val_loss) else None,
            "tokens": self.step * self.tokens_per_step,
            "wall_s": round(self.seconds, 3),
            "tokens_per_s": round(self.step * self.tokens_per_step / max(self.seconds, 1e-9), 1),
            "n_params": self.model.num_params(),
            "config": self.cfg.to_dict(),
            "provenance": provenance(),
        }
        atomic_write_json(self.out / SUMMARY, summary)  # last: marks the run finished
        return summary


def train(cfg: RunConfig, out_dir: Path | str, stop_after: int | None = None) -> dict[str, Any]:
    """Train one run into `out_dir`, resuming if a checkpoint exists; idempotent once finished."""
    out = Path(out_dir)
    if (out / SUMMARY).exists():
        return json.loads((out / SUMMARY).read_text())
    out.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, out).run(stop_after=stop_after)


def load_run_config(path: Path | str) -> RunConfig:
    return RunConfig.from_dict(json.loads(Path(path).read_text()))
