"""Reading what a run left in W&B's offline files and MLflow's file store, through each package's own
reader (never through ofe's code), and the run folder's own rows to compare them with."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd


def offline_env(monkeypatch, root: Path) -> None:
    """W&B offline, quiet, with every file it writes under `root` (no network, nothing in ~)."""
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        (root / name.lower()).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(name, str(root / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


# ---- the run folder's side ---------------------------------------------------------------------------

def parquet_metrics(run: Path) -> dict[tuple[str, int], float]:
    """{(tracker name, step): value} from metrics.parquet, named as docs/tracking.md specifies, with the
    tokens at each step."""
    df = pd.read_parquet(run / "metrics.parquet")
    out: dict[tuple[str, int], float] = {}
    for r in df.itertuples():
        name = f"{r.site}/{r.metric}" if r.layer == -1 else f"{r.metric}/{r.site}/layer_{r.layer}"
        out[(name, int(r.step))] = float(r.value)
        out[("tokens", int(r.step))] = float(r.tokens)
    return out


def parquet_quant(run: Path) -> dict[str, float]:
    df = pd.read_parquet(run / "quant.parquet")
    return {f"int8/{r.protocol}/bits{r.bits}/{col}": float(getattr(r, col))
            for r in df.itertuples() for col in ("ppl_fp", "ppl_q", "delta")}


def flat_config(run: Path) -> dict[str, Any]:
    """summary.json's config, flattened to dotted keys, without the grid labels and the cache path."""
    config = json.loads((run / "summary.json").read_text())["config"]
    return {f"{section}.{k}": v for section, values in config.items() if section not in ("grid", "data_dir")
            for k, v in values.items()}


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# ---- MLflow, through MlflowClient -------------------------------------------------------------------

def mlflow_run(uri: str, experiment: str) -> tuple[Any, Any]:
    """(client, the one run of `experiment`) in the store at `uri`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    runs = client.search_runs([exp.experiment_id])
    return client, runs


def mlflow_points(client: Any, run_id: str) -> dict[tuple[str, int], list[float]]:
    """{(metric, step): [every value logged there]}: a step logged twice shows as two values."""
    out: dict[tuple[str, int], list[float]] = {}
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            out.setdefault((key, m.step), []).append(m.value)
    return out


# ---- W&B, through `wandb leet inspect --json` (the package's reader of its .wandb transaction logs) ----

def wandb_records(wandb_dir: Path, run_id: str) -> list[list[dict]]:
    """The records of every offline run file of tracker run `run_id`, one list per file, oldest first."""
    # a second file of the run within the same second is in offline-run-<time>-<id>-1
    files = sorted(wandb_dir.rglob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"),
                   key=lambda f: (f.parent.name.split("-")[2], len(f.parent.name)))
    assert files, f"no offline files of W&B run {run_id} under {wandb_dir}"
    out = []
    for f in files:
        res = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(f)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        out.append([json.loads(line) for line in res.stdout.splitlines() if line.strip()])
    return out


def wandb_history(files: list[list[dict]]) -> dict[tuple[str, int], list[float]]:
    """{(metric, step): [every value logged there, over all files]} from the history records."""
    out: dict[tuple[str, int], list[float]] = {}
    for records in files:
        for r in records:
            if r.get("type") == "history":
                step = int(r["history"]["step"].get("num", 0))
                for key, value in r["history"]["item"].items():
                    if not key.startswith("_"):
                        out.setdefault((key, step), []).append(float(value))
    return out


def wandb_summary(files: list[list[dict]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for records in files:
        for r in records:
            if r.get("type") == "summary":
                out.update(r["summary"].get("update", {}))
    return out


def wandb_run_record(files: list[list[dict]]) -> dict[str, Any]:
    """The first file's run record: id, project, group, name, tags, config."""
    return next(r["run"] for r in files[0] if r.get("type") == "run")
