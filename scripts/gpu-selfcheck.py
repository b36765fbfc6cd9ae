#!/usr/bin/env python
"""The GPU self-check (issue 20): twelve checks of ofe's whole CUDA path on one GPU, in about 6-7 minutes
on an H100 (each check's docstring gives its cost; each has a time budget that fails it when exceeded).

    make gpu-check                                    # creates .venv, then runs this
    .venv/bin/python scripts/gpu-selfcheck.py [--out gpu-selfcheck.json] [--only 3 4] [--keep]
    .venv/bin/python scripts/gpu-selfcheck.py --device cpu    # developers without a GPU: plumbing only

Every check prints one PASS/FAIL line with its measured figures and elapsed time; the JSON summary
(`--out`) holds each check's name, outcome, figures and error text with the torch/CUDA versions, the
GPU's name and the git revision; what the runs print goes to `--log`. A check that raises fails alone
(its traceback's last frames are reported) and the next one runs. The exit status is the number of
failed checks. `--device cpu` runs the same code at toy shapes on the CPU and marks the GPU-only
assertions (bf16, flash, host syncs, GPU memory, throughput) "skipped (cpu smoke)": it proves the
script runs, never the GPU path. Never part of `make test` (pytest collects tests/ only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]  # this checkout's ofe (and benchmarks), and gpucheck
# launched jobs (check 12) are fresh processes: they must import the same ofe
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing here may reach a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from gpucheck import scale_checks as sc  # noqa: E402
from gpucheck import train_checks as tc  # noqa: E402
from gpucheck.common import CheckFailed, Context, Result  # noqa: E402

# (number, name, function, budget in seconds on one H100: about twice the expected time)
CHECKS: list[tuple[int, str, Callable[[Context, Result], None], float]] = [
    (1, "cuda-bf16-flash", tc.cuda_bf16_flash, 30),
    (2, "cpu-fp32-vs-gpu-bf16", tc.cpu_vs_gpu, 30),
    (3, "tiny-run-60-steps", tc.tiny_run, 45),
    (4, "kill-and-resume", tc.kill_and_resume, 60),
    (5, "micro-batches", tc.micro_batches, 30),
    (6, "fsdp-one-rank", tc.fsdp_one_rank, 45),
    (7, "compile-no-recompiles", tc.compile_no_recompiles, 120),
    (8, "optimisers-130m", sc.optimisers_130m, 120),
    (9, "memory-350m", sc.memory_350m, 60),
    (10, "throughput-130m", sc.throughput, 240),
    (11, "quantise-on-gpu", sc.quantise, 60),
    (12, "local-launch", sc.launched, 60),
]


class OverBudget(BaseException):
    """Raised by the timer in the check that ran out of time (a BaseException: no `except Exception` in
    the code under test can swallow it)."""


def _alarm(_signum: int, _frame: Any) -> None:
    raise OverBudget()


def run_check(ctx: Context, number: int, name: str, fn: Callable, budget: float) -> dict[str, Any]:
    """One check, isolated: any exception fails it with the last frames of its traceback."""
    r, error = Result(), None
    scoped = replace(ctx, check_dir=ctx.folder(f"{number:02d}-{name}"))  # the token caches stay shared
    t0 = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        if ctx.gpu and not torch.cuda.is_available():
            raise CheckFailed(f"CUDA is not usable: torch {torch.__version__} built for CUDA {torch.version.cuda} "
                              f"(None: a CPU-only wheel), CUDA_VISIBLE_DEVICES="
                              f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}; nvidia-smi shows the driver")
        fn(scoped, r)
    except CheckFailed as e:
        error = str(e)
    except OverBudget:
        error = f"over its time budget of {budget:.0f} s: stopped"
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - a failing check must not stop the others
        error = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-4)).strip()[-4000:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _cleanup(ctx)
    elapsed = time.perf_counter() - t0
    passed = error is None and not r.failures
    return {"number": number, "name": name, "passed": passed, "figures": r.figures, "failures": r.failures,
            "skipped": r.skipped, "error": error, "elapsed_s": round(elapsed, 2), "budget_s": budget}


def _cleanup(ctx: Context) -> None:
    """Leave nothing of a check (above all a failed one) to the next: process group, sync mode, memory."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if ctx.gpu and torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode(0)
    ctx.free_memory()


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def report_line(c: dict[str, Any]) -> str:
    head = "PASS" if c["passed"] else "FAIL"
    figures = " ".join(f"{k}={_fmt(v)}" for k, v in c["figures"].items())
    lines = [f"{head} {c['number']:2d} {c['name']:<22} {c['elapsed_s']:6.1f} s / {c['budget_s']:.0f} s  {figures}"]
    lines += [f"        failed: {why}" for why in c["failures"]]
    lines += [f"        {what}" for what in c["skipped"]]
    if c["error"]:
        lines += ["        error: " + line for line in c["error"].splitlines()]
    return "\n".join(lines)


def git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty" if dirty else "")


def environment(ctx: Context) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {"mode": "gpu" if ctx.gpu else "cpu smoke", "device": str(ctx.device), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
            "git": git_revision(), "python": platform.python_version(), "host": platform.node()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cuda (the self-check) or cpu (a smoke run of the script's plumbing at toy shapes)")
    ap.add_argument("--out", default="gpu-selfcheck.json", help="the JSON summary")
    ap.add_argument("--log", default="gpu-selfcheck.log", help="where the runs' own output goes")
    ap.add_argument("--only", type=int, nargs="+", metavar="N", help="run only these checks (1-12)")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU (default: by name)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every check's time budget")
    ap.add_argument("--threads", type=int, help="train.threads of the runs (default: up to 8 on a GPU host, 1 in cpu mode)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--verbose", action="store_true", help="the runs' output on the terminal, not in --log")
    args = ap.parse_args()
    unknown = set(args.only or []) - {n for n, *_ in CHECKS}
    if unknown:
        ap.error(f"--only: no check {sorted(unknown)}; the checks are 1-{len(CHECKS)}")

    threads = args.threads or (min(8, os.cpu_count() or 1) if args.device == "cuda" else 1)
    for path in (args.out, args.log):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ofe-gpucheck-"))
    ctx = Context(torch.device(args.device), tmp, threads=threads, peak_tflops=args.peak_tflops)
    env = environment(ctx)
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print(f"scratch {tmp}; the runs' output: {'this terminal' if args.verbose else args.log}", flush=True)
    summary: dict[str, Any] = {**env, "checks": []}
    signal.signal(signal.SIGALRM, _alarm)
    t0 = time.perf_counter()
    with open(args.log, "w") as log:
        for number, name, fn, budget in CHECKS:
            if args.only and number not in args.only:
                continue
            quiet = contextlib.nullcontext() if args.verbose else _redirect(log)
            with quiet:
                print(f"==== check {number} {name}", flush=True)
                result = run_check(ctx, number, name, fn, budget * args.budget_scale)
            summary["checks"].append(result)
            print(report_line(result), flush=True)
            summary["failures"] = sum(not c["passed"] for c in summary["checks"])
            summary["total_s"] = round(time.perf_counter() - t0, 1)
            Path(args.out).write_text(json.dumps(summary, indent=2, default=str))  # after every check
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    failures = summary.get("failures", 0)
    print(f"{len(summary['checks']) - failures}/{len(summary['checks'])} passed in {summary.get('total_s', 0):.0f} s "
          f"(target: under 480 s on one GPU); summary: {args.out}")
    return failures


@contextlib.contextmanager
def _redirect(log: Any) -> Any:
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


if __name__ == "__main__":
    sys.exit(min(main(), 255))
