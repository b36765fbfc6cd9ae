# config.yaml -> validated plan (the union of every study's runs). Validation happens here, at parse
# time, so a typo fails before any job starts, with the key and the allowed values in the message.
import json
import sys
from pathlib import Path

from ofe.__main__ import plan_from_config
from ofe.config import ConfigError

SCHEMA = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
RESULTS = config.get("results_dir", "results")
REPORT = config.get("report", "reports/index.html")



def load_launcher(config):
    """config.yaml's `launcher`, updated from the file a profile names in `launcher_file` (how jobs run
    belongs to the profile; what they compute to config.yaml)."""
    import yaml

    launcher = dict(config.get("launcher") or {"cluster": "local"})
    if config.get("launcher_file"):
        launcher.update(yaml.safe_load(Path(config["launcher_file"]).read_text()) or {})
    return launcher


LAUNCHER = load_launcher(config)
# Passed to `ofe launch` inside the shell command, not as params: switching local <-> slurm, or a
# partition, must not rerun finished runs (Snakemake reruns jobs whose params change).
LAUNCHER_JSON = json.dumps(LAUNCHER, sort_keys=True)

try:
    PLAN = plan_from_config(config, SCHEMA, Path(RESULTS) / "data")
except ConfigError as e:
    sys.exit(f"ofe: configuration error:\n{e}")

RUNS = {r["run_id"]: r for r in PLAN["runs"]}
print(f"ofe: {len(RUNS)} runs in {len(PLAN['studies'])} studies; training jobs go to "
      f"{LAUNCHER.get('cluster', 'local')} (submitit)", file=sys.stderr)
DATA_DIR = PLAN["data"]["dir"]


wildcard_constraints:
    run=".+",


def run_config_json(wildcards):
    return json.dumps(RUNS[wildcards.run]["config"], sort_keys=True)


def run_threads(wildcards):
    return RUNS[wildcards.run]["config"]["train"]["threads"]
