"""What a sweep costs the head node and the scheduler: a `tiny` grid through the slurm profile (issue 22).

    PYTHONPATH=. .venv/bin/python benchmarks/head.py [--runs 64] [--steps 20] [--mode one|array|pack]
        [--launcher FILE] [--poll-s 5] [--keep DIR] [--json FILE] [--label TEXT] [--verbose] [-- SNAKEMAKE ARGS]
    PYTHONPATH=. .venv/bin/python benchmarks/head.py --compare DIR_A DIR_B

Runs `snakemake --profile profiles/slurm --config launcher_file=<file>` on a grid of --runs distinct `tiny`
runs (block [pre_ln, op] x 4 learning rates x seeds; 2 layers, d_model 32, 20 steps, batch 4, stdlib
text) in a fresh work folder, against the SLURM it finds (scripts/slurm-localhost.sh start), and prints:
- wall: the snakemake command's wall time, its exit code, and the runs completed (results/runs.parquet);
- SLURM calls: every `sbatch`, `squeue` and `sacct` the head made, counted by wrappers put first on
  PATH (each appends a line to a counter file, then runs the real command); calls made inside jobs
  (SLURM_JOB_ID set) are counted apart. "Queries per poll" is (squeue + sacct calls) / (wall / poll_s);
- head memory: every 0.5 s, the RSS summed over the head's processes: snakemake and all its descendants
  (waiting rules, their shells, the wrappers), plus any `ofe dispatch` process with this benchmark's
  tag in its environment (a dispatcher detached from snakemake), and its descendants. Job processes
  descend from slurmstepd, not snakemake: not counted. Shared pages count once per process (RSS, not
  PSS): the sum overstates what the head holds. Its peak over the whole command (data preparation and
  the report included), and while runs are in flight: their rule has started (Snakemake made the run's
  folder) and they have no quant.parquet yet.

--mode writes the launcher file (job_name_prefix unique to this invocation, `tiny`: 1 CPU, 1 GB,
10 min per run, the same in every mode so the modes compare):
    one:   one SLURM job per run            (cluster: slurm, poll_s, job_name_prefix, scales.tiny)
    array: the same, plus `array: true`     (and `array_parallelism: N` with --array-parallelism N)
    pack:  `array: true` and `scales.tiny.pack: 8` (--pack N): several runs per job
--launcher FILE passes your own file through instead (its poll_s and job_name_prefix are read back).
The profile's other settings (ofe_jobs, cores, retries) apply; arguments after `--` go to snakemake.

--compare DIR_A DIR_B checks that two kept work folders (--keep) hold the same runs with identical
results, each run's metrics.parquet and quant.parquet rows compared exactly, every column (exit 1 on
a difference): how the array and packed modes are shown to compute what one job per run computes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("sbatch", "squeue", "sacct")
LRS = [3e-3, 6e-3, 1e-2, 2e-2]
BLOCKS = ["pre_ln", "op"]
SAMPLE_S = 0.5
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20
TAG_VAR = "OFE_HEAD_BENCH"  # in every head process's environment: how this run's dispatcher is told apart

# Each call appends "time tool where" to the counter file; sbatch's output is kept too (the job ids),
# so that a run killed on --timeout-s cancels exactly the jobs it submitted, never another user's.
WRAPPER = """#!/bin/bash
where=head; [ -n "$SLURM_JOB_ID" ] && where=job
printf '%s {tool} %s\\n' "$EPOCHREALTIME" "$where" >> {counter}
"""
EXEC = 'exec {real} "$@"\n'
SBATCH = 'out=$({real} "$@"); rc=$?; printf "%s\\n" "$out"; printf "%s\\n" "$out" >> {ids}; exit $rc\n'


def grid_config(runs: int, steps: int) -> dict:
    """A config of `runs` distinct tiny runs: block x lr (8 points) x seeds 0..runs//8-1, then the
    remainder as more seeds of the first point, so any --runs works and 64 is the issue's 2 x 4 x 8."""
    studies: dict[str, dict] = {}
    if runs >= 8:
        studies["grid"] = {"grid": {"block": BLOCKS, "lr": LRS, "seed": list(range(runs // 8))}}
    if runs % 8:
        seeds = list(range(runs // 8, runs // 8 + runs % 8))
        studies["rest"] = {"grid": {"block": BLOCKS[:1], "lr": LRS[:1], "seed": seeds}}
    return {
        "data": {"source": "stdlib", "max_documents": 120},
        "quant": {"bits": [8], "calib_batches": 1, "eval_batches": 1},
        "defaults": {
            "block": "pre_ln", "scale": "tiny", "optimizer": "adamw", "lr": 1.0e-2, "seed": 0,
            "model": {"n_layer": 2, "d_model": 32, "n_head": 2, "context": 32},
            "train": {"steps": steps, "batch_size": 4, "log_every": 5, "eval_every": 10, "checkpoint_every": 10},
        },
        "studies": studies,
    }


def launcher_for(mode: str, poll_s: float, pack: int, array_parallelism: int | None) -> dict:
    tiny: dict = {"cpus_per_task": 1, "mem_gb": 1, "timeout_min": 10}
    out = {"cluster": "slurm", "job_name_prefix": f"ofehead{uuid.uuid4().hex[:6]}-", "poll_s": poll_s,
           "scales": {"tiny": tiny}}
    if mode != "one":
        out.update({"array": True, **({"array_parallelism": array_parallelism} if array_parallelism else {})})
    if mode == "pack":
        tiny["pack"] = pack  # per-run resources as in the other modes: the launcher sizes a packed job
    return out


def install_wrappers(bin_dir: Path, counter: Path, ids: Path) -> None:
    """bin_dir/{sbatch,squeue,sacct}, each counting its calls, then running the real one (found now,
    on the PATH without bin_dir, so a wrapper never calls itself)."""
    bin_dir.mkdir(parents=True)
    for tool in TOOLS:
        if (real := shutil.which(tool)) is None:
            sys.exit(f"head.py: no {tool} on PATH: start SLURM first (scripts/slurm-localhost.sh start)")
        tail = SBATCH.format(real=real, ids=ids) if tool == "sbatch" else EXEC.format(real=real)
        path = bin_dir / tool
        path.write_text(WRAPPER.format(tool=tool, counter=counter) + tail)
        path.chmod(0o755)


def read_calls(counter: Path) -> dict[str, dict[str, int]]:
    calls = {tool: {"head": 0, "job": 0} for tool in TOOLS}
    for _, tool, where in (line.split() for line in (counter.read_text() if counter.exists() else "").splitlines()):
        calls[tool][where] += 1
    return calls


def _processes() -> dict[int, tuple[int, str]]:
    """{pid: (ppid, comm)} of every process now."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or not (stat := _read(f"/proc/{entry.name}/stat").decode(errors="replace")):
            continue  # not a process, or one that exited between the listing and the read
        # comm is in parentheses and may hold spaces or parentheses itself: split at the last ')'
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        table[int(entry.name)] = (int(rest[1]), comm)
    return table


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:  # the process has exited
        return b""


def _under_slurmstepd(pid: int, table: dict[int, tuple[int, str]]) -> bool:
    while pid in table and pid > 1 and not table[pid][1].startswith("slurmstepd"):
        pid = table[pid][0]
    return pid in table and table[pid][1].startswith("slurmstepd")


def head_processes(root: int, tag: str) -> dict[int, str]:
    """{pid: comm} of `root` and its descendants, and of every tagged `ofe dispatch` process that no
    SLURM job runs (and their descendants)."""
    table = _processes()
    roots = {root} if root in table else set()
    for pid in table:  # every command line, whatever runs it (python, an `ofe` script, nohup)
        if (b"ofe dispatch" in _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ")
                and f"{TAG_VAR}={tag}".encode() in _read(f"/proc/{pid}/environ") and not _under_slurmstepd(pid, table)):
            roots.add(pid)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found[pid] = table[pid][1]
            todo.extend(children.get(pid, []))
    return found


def _label(pid: int, comm: str) -> str:
    """A short name for --verbose: `python -m ofe launch`, `snakemake`, `bash`, ..."""
    args = [a.decode(errors="replace") for a in _read(f"/proc/{pid}/cmdline").split(b"\0") if a]
    if "-m" in args:
        i = args.index("-m")
        return "python -m " + " ".join(args[i + 1:i + 3])
    if len(args) > 1 and Path(args[0]).name.startswith("python") and not args[1].startswith("-"):
        return Path(args[1]).name  # a script: snakemake
    return Path(args[0]).name if args else comm


class Sampler(threading.Thread):
    """Every SAMPLE_S: the head's summed RSS, its process count and the runs in flight."""

    def __init__(self, root: int, tag: str, run_dirs: list[Path], verbose: bool) -> None:
        super().__init__(daemon=True)
        self.root, self.tag, self.run_dirs, self.verbose = root, tag, run_dirs, verbose
        self.samples: list[tuple[float, float, int, int, int]] = []  # (t, rss MB, processes, in flight, done)
        # the peak of the whole command (planning and data preparation included), and the peak while
        # runs are in flight (the waiting the issue is about): [sample, [(label, RSS MB)] if verbose]
        self.peaks: dict[str, list] = {"all": [None, []], "in_flight": [None, []]}
        self.stop = threading.Event()
        self.start_time = time.time()

    def run(self) -> None:
        while not self.stop.is_set():
            procs = head_processes(self.root, self.tag)
            # statm's second field: resident pages (the file reads empty once the process has exited)
            rss = {pid: int(statm[1]) * PAGE_MB for pid in procs
                   if len(statm := _read(f"/proc/{pid}/statm").split()) > 1}
            started = [d for d in self.run_dirs if d.is_dir()]
            done = sum((d / "quant.parquet").exists() for d in started)
            sample = (round(time.time() - self.start_time, 2), round(sum(rss.values()), 1), len(rss),
                      len(started) - done, done)
            self.samples.append(sample)
            for key, peak in self.peaks.items():
                if (key == "all" or sample[3]) and (peak[0] is None or sample[1] > peak[0][1]):
                    # labels read now, while those processes exist
                    names = [(_label(pid, procs[pid]), mb) for pid, mb in rss.items()] if self.verbose else []
                    peak[:] = [sample, names]
            self.stop.wait(SAMPLE_S)


def _completed(results: Path) -> tuple[int, str]:
    try:
        return int((pd.read_parquet(results / "runs.parquet").status == "completed").sum()), "runs.parquet"
    except (OSError, ValueError, AttributeError):  # no aggregate (a failed sweep): the completion marks
        return len(list((results / "runs").rglob("quant.parquet"))), "quant.parquet files"


def _submitted_ids(ids: Path) -> list[str]:
    return [line.split()[-1] for line in (ids.read_text().splitlines() if ids.exists() else [])
            if line.startswith("Submitted batch job")]


def bench(args: argparse.Namespace, snakemake_args: list[str]) -> dict:
    from ofe.plan import grid

    if args.keep and Path(args.keep).exists() and any(Path(args.keep).iterdir()):
        sys.exit(f"head.py: --keep {args.keep}: not empty")
    scratch = Path(tempfile.mkdtemp(prefix="ofe-head-bench-"))
    work = Path(args.keep).resolve() if args.keep else scratch / "work"
    work.mkdir(parents=True, exist_ok=True)
    try:
        config = grid_config(args.runs, args.steps)
        (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        run_ids = list(grid.expand(config, REPO / "workflow" / "schemas" / "config.schema.yaml"))
        launcher_file = Path(args.launcher).resolve() if args.launcher else work / "launcher.yaml"
        if not args.launcher:
            launcher_file.write_text(yaml.safe_dump(
                launcher_for(args.mode, args.poll_s, args.pack, args.array_parallelism), sort_keys=False))
        launcher = yaml.safe_load(launcher_file.read_text()) or {}
        poll_s = float(launcher.get("poll_s", 2.0))  # ofe.cluster.launch's default
        counter, ids, bin_dir = scratch / "calls", scratch / "sbatch.out", scratch / "bin"
        install_wrappers(bin_dir, counter, ids)
        tag = uuid.uuid4().hex
        venv_bin = str(Path(sys.executable).parent)  # not resolved: the venv's bin, not the base python's
        env = {**os.environ, TAG_VAR: tag, "PATH": os.pathsep.join([str(bin_dir), venv_bin, os.environ["PATH"]]),
               "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)}
        snakemake = shutil.which("snakemake", path=venv_bin) or shutil.which("snakemake") or "snakemake"
        cmd = [snakemake, "-s", str(REPO / "Snakefile"), "--directory", str(work), "--profile",
               str(REPO / "profiles" / "slurm"), "--config", f"launcher_file={launcher_file}", *snakemake_args]
        print(f"head.py: {len(run_ids)} runs x {args.steps} steps in {work}; launcher {launcher_file} "
              f"(poll_s {poll_s:g}, prefix {launcher.get('job_name_prefix')})", flush=True)
        with open(work / "snakemake.log", "w") as log:
            start = time.perf_counter()
            # its own session, so a timeout can kill the head's whole process tree at once
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            sampler = Sampler(proc.pid, tag, [work / "results" / "runs" / r for r in run_ids], args.verbose)
            sampler.start()
            try:
                rc = proc.wait(timeout=args.timeout_s)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                os.killpg(proc.pid, 9)
                rc = proc.wait()
                mine = _submitted_ids(ids)  # only the jobs this benchmark submitted
                if mine:
                    subprocess.run([shutil.which("scancel") or "scancel", *mine])
                print(f"head.py: stopped after {time.perf_counter() - start:.0f} s; cancelled {len(mine)} jobs")
            wall = time.perf_counter() - start
            sampler.stop.set()
            sampler.join()
        if rc != 0:
            print("".join((work / "snakemake.log").read_text().splitlines(keepends=True)[-40:]), file=sys.stderr)
        completed, source = _completed(work / "results")
        calls = read_calls(counter)
        queries = calls["squeue"]["head"] + calls["sacct"]["head"]
        mine = _submitted_ids(ids)
        records = subprocess.run([shutil.which("sacct") or "sacct", "-n", "-X", "-P", "-o", "JobID", "-j",
                                  ",".join(mine)], capture_output=True, text=True).stdout.split() if mine else []
        return {
            "label": args.label, "host": _host(), "runs": len(run_ids), "steps": args.steps,
            "mode": "file" if args.launcher else args.mode, "launcher": launcher, "poll_s": poll_s,
            "wall_s": round(wall, 1), "snakemake_rc": rc, "completed": completed, "completed_from": source,
            "calls": calls, "sbatch_jobs": len(mine), "sacct_job_records": len(records),
            "queries": queries, "queries_per_poll": round(queries / (wall / poll_s), 2),
            "peaks": {key: _peak(*peak) for key, peak in sampler.peaks.items()},
            "peak_processes": max((s[2] for s in sampler.samples), default=0),
            "peak_in_flight": max((s[3] for s in sampler.samples), default=0),
            "work": str(work) if args.keep else None,
            "samples": {"columns": ["t_s", "rss_mb", "processes", "in_flight", "done"], "rows": sampler.samples},
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


def _peak(sample: tuple | None, procs: list[tuple[str, float]]) -> dict:
    """A peak sample's figures, and (--verbose) its processes grouped by name: {name: [count, MB]}."""
    t, rss, n, flight, _ = sample or (0.0, 0.0, 0, 0, 0)
    groups: dict[str, list] = {}
    for name, mb in procs:
        group = groups.setdefault(name, [0, 0.0])
        group[0], group[1] = group[0] + 1, round(group[1] + mb, 1)
    return {"rss_mb": rss, "at_s": t, "processes": n, "in_flight": flight,
            "mb_per_run": round(rss / flight, 1) if flight else None,
            "process_groups": dict(sorted(groups.items(), key=lambda g: -g[1][1]))}


def _host() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"{model}, {os.cpu_count()} CPUs"


def report(f: dict, verbose: bool) -> None:
    c = f["calls"]
    print(f"head.py{' [' + f['label'] + ']' if f['label'] else ''}: {f['runs']} runs x {f['steps']} steps, "
          f"mode {f['mode']}, poll_s {f['poll_s']:g}; host {f['host']}")
    print(f"wall:              {f['wall_s']:.1f} s, snakemake exit {f['snakemake_rc']}, "
          f"{f['completed']}/{f['runs']} runs completed ({f['completed_from']})")
    print(f"SLURM submissions: {c['sbatch']['head']} sbatch calls ({f['sacct_job_records']} job records in sacct)")
    print(f"scheduler queries: {f['queries']} ({c['squeue']['head']} squeue, {c['sacct']['head']} sacct): "
          f"{f['queries_per_poll']:.2f} per poll ({f['wall_s']:.0f} s / {f['poll_s']:g} s)")
    if any(c[t]["job"] for t in TOOLS):
        print("                   inside jobs: " + ", ".join(f"{c[t]['job']} {t}" for t in TOOLS))
    for key, what in (("all", "peak head RSS:     "), ("in_flight", "  with runs in flight:")):
        p = f["peaks"][key]
        print(f"{what} {p['rss_mb']:.0f} MB summed over {p['processes']} processes at {p['at_s']:.0f} s, "
              f"{p['in_flight']} runs in flight" + (f" ({p['mb_per_run']:.1f} MB per run)" if p["mb_per_run"] else ""))
    print(f"head processes:    {f['peak_processes']} at most; runs in flight: {f['peak_in_flight']} at most")
    for key in f["peaks"] if verbose else ():
        print(f"at the peak ({key}):")
        for name, (count, mb) in f["peaks"][key]["process_groups"].items():
            print(f"  {mb:8.1f} MB  {count:3d} x {name}")


def _run_folders(root: Path) -> dict[str, Path]:
    """{run id: folder} of the runs under a work folder (or its results/ folder)."""
    runs = root / "results" / "runs" if (root / "results" / "runs").is_dir() else root / "runs"
    found = {p.parent for name in ("metrics.parquet", "quant.parquet") for p in runs.rglob(name)}
    return {str(p.relative_to(runs)): p for p in found}


def compare(a: Path, b: Path) -> int:
    """0 if both folders hold the same runs with identical metrics and quant tables, else 1."""
    ra, rb = _run_folders(a), _run_folders(b)
    if set(ra) != set(rb) or not ra:
        print(f"runs differ: {len(ra)} vs {len(rb)}; only in A: {sorted(set(ra) - set(rb))[:5]}, "
              f"only in B: {sorted(set(rb) - set(ra))[:5]}")
        return 1
    differ, rows = [], {"metrics.parquet": 0, "quant.parquet": 0}
    for run_id in sorted(ra):
        for name in rows:
            try:
                # the rows are the claim, not their order (a packed job may log in another): sorted by
                # every column, then compared exactly, dtypes included (NaN equals NaN in place)
                da, db = (pd.read_parquet(r[run_id] / name) for r in (ra, rb))
                da, db = (d.sort_values(list(d.columns)).reset_index(drop=True) for d in (da, db))
                pd.testing.assert_frame_equal(da, db, check_exact=True)
                rows[name] += len(da)
            except (AssertionError, OSError, KeyError) as e:
                differ.append(f"{run_id}/{name}: " + (str(e).strip().splitlines() or [type(e).__name__])[0])
    if differ:
        print(f"{len(differ)} differences in {len(ra)} runs:\n  " + "\n  ".join(differ[:20]))
        return 1
    print(f"identical: {len(ra)} runs, {rows['metrics.parquet']} metric rows, {rows['quant.parquet']} quant rows "
          f"(every column, exactly)")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mode", choices=["one", "array", "pack"], default="one", help="the launcher file to write")
    parser.add_argument("--launcher", help="a launcher file to pass through instead of --mode's")
    parser.add_argument("--poll-s", type=float, default=5.0, help="--mode's poll_s")
    parser.add_argument("--pack", type=int, default=8, help="--mode pack's scales.tiny.pack")
    parser.add_argument("--array-parallelism", type=int, help="--mode array/pack's array_parallelism")
    parser.add_argument("--keep", help="the work folder, kept (must be new or empty)")
    parser.add_argument("--json", help="write the figures (and the RSS samples) here")
    parser.add_argument("--label", default="")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="kill the head and its jobs after this")
    parser.add_argument("--verbose", action="store_true", help="list the head's processes at the peak RSS")
    parser.add_argument("--compare", nargs=2, metavar=("DIR_A", "DIR_B"))
    parser.add_argument("snakemake_args", nargs="*", help="after --: more snakemake arguments")
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(Path(args.compare[0]), Path(args.compare[1])))
    sys.path.insert(0, str(REPO))
    figures = bench(args, args.snakemake_args)
    report(figures, args.verbose)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    sys.exit(0 if figures["snakemake_rc"] == 0 else 1)


if __name__ == "__main__":
    main()
