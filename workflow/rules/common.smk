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
LAUNCHER = config.get("launcher", {"cluster": "local"})

try:
    PLAN = plan_from_config(config, SCHEMA, Path(RESULTS) / "data")
except ConfigError as e:
    sys.exit(f"ofe: configuration error:\n{e}")

RUNS = {r["run_id"]: r for r in PLAN["runs"]}
DATA_DIR = PLAN["data"]["dir"]


wildcard_constraints:
    run=".+",


def run_config_json(wildcards):
    return json.dumps(RUNS[wildcards.run]["config"], sort_keys=True)


def run_threads(wildcards):
    return RUNS[wildcards.run]["config"]["train"]["threads"]
