# config.yaml -> validated plan (the union of every study's runs). Validation happens here, at parse
# time, so a typo fails before any job starts, with the key and the allowed values in the message:
# duplicate keys in the config files, types, ranges, paths, the grid's size, run folder names, the
# launcher settings, whether each run's batch splits over its processes, and whether each run's
# estimated memory fits its process's (the plan is printed to stderr).
import functools
import json
import os
import sys
from pathlib import Path

from ofe.config import ConfigError
from ofe.plan import memplan, plan_from_config
from ofe.plan.grid import check_launcher, check_packing, default_figures_dir, launcher_settings, load_config, runs_digest, validate
from ofe.plan.studies import job_spec, measure_settings
from ofe.plan.tracking import tracking_settings

SCHEMA = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"


def load_launcher(config):
    """config.yaml's `launcher`, updated from the file a profile names in `launcher_file` (how jobs run
    belongs to the profile; what they compute to config.yaml), validated by the schema's
    $defs/launcher. A missing file or a bad key is a ConfigError naming it."""
    return launcher_settings(config, SCHEMA)


try:
    # Snakemake reads config files keeping the last of duplicate keys; read them again strictly
    for path in workflow.configfiles:
        load_config(path)
    LAUNCHER = load_launcher(validate(config, SCHEMA))  # the launcher before expanding the grid
    PLAN = plan_from_config(config, SCHEMA)
    TRACKING = tracking_settings(PLAN["config"])  # W&B / MLflow (docs/tracking.md), resolved
    check_launcher(PLAN["runs"], LAUNCHER)
    check_packing(LAUNCHER)  # job arrays and packed runs (profiles/slurm/launcher.yaml)
    # each run's estimated memory per process against its launcher entry's (ofe/plan/memory.py): printed,
    # and a run that would not fit stops the workflow here rather than hours later in the queue
    MEMORY = memplan.plan(PLAN["runs"], LAUNCHER)
    if MEMORY:  # training runs only: an inspection job checks its model against its memory (ofe.pretrained.hf)
        print(memplan.format_compact(MEMORY), file=sys.stderr)
    memplan.check(MEMORY)
except ConfigError as e:
    sys.exit(f"ofe: configuration error:\n{e}")

RESULTS = PLAN["config"].get("results_dir", "results")
REPORT = PLAN["config"].get("report", "reports/index.html")
# Passed to `ofe launch` inside the shell command, not as params: switching local <-> slurm, or a
# partition, must not rerun finished runs (Snakemake reruns jobs whose params change). The tracking
# settings ride in it under `tracking` (`ofe launch` takes them out) for the same reason: turning tracking
# on must not retrain or requantise finished runs (`ofe export` mirrors those), and a new argument in the
# rule's command would (Snakemake reruns jobs whose command template changes).
LAUNCHER_JSON = json.dumps({**LAUNCHER, **({"tracking": TRACKING} if TRACKING["backend"] != "none" else {})},
                           sort_keys=True)
RUNS = {r["run_id"]: r for r in PLAN["runs"]}
CHECKPOINTS = {c["ckpt_id"]: c for c in PLAN["checkpoints"]}  # checkpoint studies (ofe/plan/studies.py)
# the report refuses tables of another set of runs and checkpoints
RUNS_DIGEST = runs_digest([*RUNS, *(f"checkpoint:{c}" for c in CHECKPOINTS)])
print(f"ofe: {len(RUNS)} runs" + (f" and {len(CHECKPOINTS)} checkpoints" if CHECKPOINTS else "")
      + f" in {len(PLAN['studies'])} studies; training jobs go to {LAUNCHER.get('cluster', 'local')} (submitit)"
      + (", inspection jobs too" if CHECKPOINTS else ""), file=sys.stderr)
DATA_DIR = PLAN["data"]["dir"]


wildcard_constraints:
    run=".+",
    ckpt=".+",


@functools.lru_cache(maxsize=None)  # Snakemake expands a job's params more than once
def config_json(run_id):
    return json.dumps(RUNS[run_id]["config"], sort_keys=True)


def run_config_json(wildcards):
    return config_json(wildcards.run)


def run_threads(wildcards):
    return RUNS[wildcards.run]["config"]["train"]["threads"]


# A constant where every run uses the same number of threads (the usual grid): Snakemake inspects a
# function's signature for every job, seconds for a 10,000-run grid.
THREADS = {r["config"]["train"]["threads"] for r in PLAN["runs"]}
RUN_THREADS = THREADS.pop() if len(THREADS) == 1 else run_threads
# On SLURM a waiting rule takes no CPU of the head (its job's CPUs come from the launcher's scale): one
# head slot each, so `cores` in profiles/slurm caps the runs in flight, not their threads.
if LAUNCHER.get("cluster") == "slurm":
    RUN_THREADS = 1
