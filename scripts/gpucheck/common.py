"""What every check shares: the context (device, mode, temporary folders, token caches, run configs), the
result a check fills in, and the hooks that time a Trainer's steps and count its host syncs."""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ofe.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from ofe.plan import presets

SYNC_WARNING = "synchronizing CUDA operation"  # c10's warn_or_error_on_sync() text
# Vocabularies of the paper-scale checks: 130m is CodeParrot's GPT-2 tokenizer (about 50k, the issue's
# 52,000), 350m Languini's 16,384. Their tokens are random: only shapes and memory matter there.
VOCAB = {"130m": 52_000, "350m": 16_384}
# Shapes of the CPU smoke mode (developers without a GPU): the same code paths at toy sizes.
SMOKE_MODEL = {"tiny": dict(n_layer=2, d_model=32, n_head=2, context=32),
               "130m": dict(n_layer=2, d_model=64, n_head=2, context=32),
               "350m": dict(n_layer=2, d_model=64, n_head=2, context=64)}
SMOKE_BATCH = {"tiny": 4, "130m": 8, "350m": 4}
SMOKE_VOCAB = 1000


@functools.lru_cache(maxsize=None)
def benchmark() -> Any:
    """benchmarks/throughput.py as a module (benchmarks/ is not a package): check 10 runs its `measure`,
    the same measurement docs/benchmarks.md reports."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"
    spec = importlib.util.spec_from_file_location("ofe_throughput_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CheckFailed(Exception):
    """A failure that ends a check early, reported by its message alone (no traceback)."""


@dataclass
class Result:
    """One check's outcome: its measured figures, the conditions it failed, what the mode skipped."""

    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def fig(self, **figures: Any) -> None:
        self.figures.update(figures)

    def expect(self, ok: bool, why: str) -> bool:
        if not ok:
            self.failures.append(why)
        return bool(ok)

    def skip(self, what: str) -> None:
        self.skipped.append(f"{what}: skipped (cpu smoke)")


@dataclass
class Context:
    """The device under test and the scratch space; `smoke` is the CPU mode with toy shapes."""

    device: torch.device
    tmp: Path
    threads: int = 1
    peak_tflops: float | None = None
    check_dir: Path | None = None
    """The running check's own folder (`folder` makes its subfolders there)."""
    _caches: dict[str, Path] = field(default_factory=dict)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def smoke(self) -> bool:
        return not self.gpu

    def folder(self, name: str) -> Path:
        path = (self.check_dir or self.tmp) / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ---- token caches ---------------------------------------------------------------------------
    def byte_data(self) -> Path:
        """The embedded corpus (stdlib .py files, byte tokens), prepared once."""
        if "bytes" not in self._caches:
            from ofe.core.data import prepare

            out = self.tmp / "data-bytes"
            prepare(DataConfig(max_documents=200), out)
            self._caches["bytes"] = out
        return self._caches["bytes"]

    def random_data(self, vocab: int) -> Path:
        """Random tokens below `vocab` in `ofe.core.data.prepare`'s format, written by the throughput benchmark's
        own writer (2M train tokens: 64 windows of 129 x 128 fit many times over)."""
        key = f"random-{vocab}"
        if key not in self._caches:
            self._caches[key] = benchmark().write_random_tokens(self.tmp / f"data-{key}", vocab, 2_000_000, vocab)
        return self._caches[key]

    # ---- run configs ----------------------------------------------------------------------------
    def config(self, shape: str = "tiny", optimizer: str = "adamw", device: str | None = None,
               **train: Any) -> RunConfig:
        """A run at `shape` ('tiny' on byte data; '130m' / '350m' the presets' pre_ln models on random
        tokens; toy sizes in smoke mode) with `train` overrides. GPU runs resolve precision 'auto' (bf16)."""
        if shape == "tiny":
            model = dict(SMOKE_MODEL["tiny"]) if self.smoke else dict(n_layer=2, d_model=128, n_head=2, context=64)
            batch, data = (SMOKE_BATCH["tiny"] if self.smoke else 8), self.byte_data()
        else:
            p = presets.resolve(shape, "pre_ln", optimizer=optimizer)
            model = {**p["model"], **(SMOKE_MODEL[shape] if self.smoke else {})}
            model["vocab_size"] = SMOKE_VOCAB if self.smoke else VOCAB[shape]
            batch = SMOKE_BATCH[shape] if self.smoke else p["train"]["batch_size"]
            train = {k: v for k, v in p["train"].items() if k not in ("batch_size", "parallel")} | train
            data = self.random_data(model["vocab_size"])
        base = TrainConfig(steps=20, batch_size=batch, log_every=10, eval_every=10, eval_batches=2,
                           checkpoint_every=10, threads=self.threads, device=device or str(self.device))
        return RunConfig(model=ModelConfig(**model), optim=OptimConfig(name=optimizer, lr=1e-3, betas=(0.9, 0.95)),
                         train=replace(base, **train), data_dir=str(data))

    def expected_precision(self) -> str:
        return "bfloat16" if self.gpu else "float32"

    def free_memory(self) -> None:
        import gc

        gc.collect()
        if self.gpu and torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


# ---- what a run reports --------------------------------------------------------------------------

def losses(run_dir: Path) -> "Any":
    """The run's loss rows (train and val), indexed by (site, step)."""
    import pandas as pd

    df = pd.read_parquet(run_dir / "metrics.parquet")
    return df[df.metric == "loss"].set_index(["site", "step"]).value.sort_index()


def max_diff(a: "Any", b: "Any", relative: bool = False) -> float:
    """The largest difference of two aligned series (NaN if their indexes differ)."""
    if not a.index.equals(b.index):
        return math.nan
    d = (a - b).abs()
    return float((d / b.abs().clip(lower=1e-12) if relative else d).max())


def step_tensors(opt: Any) -> list[torch.Tensor]:
    """Every `step` tensor in an optimiser's state (MuonWithAdamW: both of its parts)."""
    parts = list(getattr(opt, "parts", {}).values()) or [opt]
    out = []
    for o in parts:
        for state in o.state.values():
            out += [v for k, v in state.items() if k == "step" and torch.is_tensor(v)]
        out += [g["step"] for g in o.param_groups if torch.is_tensor(g.get("step"))]
    return out


# ---- hooks on a Trainer --------------------------------------------------------------------------

@dataclass
class StepLog:
    """Per-step timestamps (the start of each loop iteration, at `_measure`) and sync counts."""

    starts: dict[int, float] = field(default_factory=dict)
    syncs: dict[int, int] = field(default_factory=dict)
    end: float = math.nan

    def durations(self) -> dict[int, float]:
        """Seconds of each iteration (the last one ends where the final probe begins)."""
        steps = sorted(self.starts)
        ends = [self.starts[s] for s in steps[1:]] + [self.end]
        return {s: e - self.starts[s] for s, e in zip(steps, ends)}

    def seconds(self, first: int) -> float:
        """From the start of iteration `first` to the end of the loop (before the final probe)."""
        return self.end - self.starts[first]


class Killed(Exception):
    """A check's kill of a training run, raised by `kill_after`'s hook."""


def kill_after(step: int) -> Callable[[Any], None]:
    """A Trainer `on_checkpoint` hook that kills the run (raises `Killed`) right after its first checkpoint
    at or past `step`."""
    def hook(trainer: Any) -> None:
        if trainer.state.step >= step:
            raise Killed(trainer.state.step)

    return hook


def instrument(trainer: Any, log: StepLog, count: Callable[[], int] = lambda: 0) -> None:
    """Record in `log` when each iteration starts and how many syncs `count` had seen by then (the
    Trainer's loop calls `_measure` first in every iteration and `_complete` after the last)."""
    measure, complete = trainer._measure, trainer._complete

    def timed_measure() -> None:
        step = trainer.state.step
        log.starts[step], log.syncs[step] = time.perf_counter(), count()
        measure()

    def timed_complete() -> None:
        log.end = time.perf_counter()
        log.syncs[trainer.state.step] = count()
        complete()

    trainer._measure, trainer._complete = timed_measure, timed_complete


class Syncs:
    """The host syncs torch reported so far (each a warning whose location is the Python line that
    caused it: an .item(), a blocking copy)."""

    def __init__(self, caught: list[warnings.WarningMessage]) -> None:
        self._caught = caught

    def _syncs(self) -> list[warnings.WarningMessage]:
        return [w for w in self._caught if SYNC_WARNING in str(w.message)]

    def count(self) -> int:
        return len(self._syncs())

    def where(self, ranges: list[tuple[int, int]]) -> dict[str, int]:
        """How many of the syncs numbered within `ranges` ([start, end) pairs) came from each file:line."""
        syncs, out = self._syncs(), {}
        for start, end in ranges:
            for w in syncs[start:end]:
                key = f"{Path(w.filename).name}:{w.lineno}"
                out[key] = out.get(key, 0) + 1
        return out


@contextlib.contextmanager
def sync_counter() -> Iterator[Syncs]:
    """Count the host syncs torch reports under `set_sync_debug_mode('warn')` (each one a warning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every occurrence, not one per source line
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield Syncs(caught)
        finally:
            torch.cuda.set_sync_debug_mode(0)


@contextlib.contextmanager
def compile_backend(ctx: Context) -> Iterator[str]:
    """torch.compile as the Trainer calls it; in smoke mode with the 'eager' backend (Dynamo's guards and
    recompiles are the same, without minutes of C++ compilation on a laptop CPU)."""
    if ctx.gpu:
        yield "inductor"
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend="eager")
    try:
        yield "eager (cpu smoke)"
    finally:
        torch.compile = original


def autocast(ctx: Context) -> Any:
    """What the Trainer's precision 'auto' does on this device: bf16 autocast on CUDA, nothing on CPU."""
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.gpu)

