"""A run or a checkpoint deleted after a finished workflow is missing, not done: the next invocation
trains (or inspects) exactly it again, then aggregates and reports, and the one after has nothing to do
(the Snakefile's rule all requests the missing completion marks)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.helpers.report_html import page_section
from tests.helpers.workflow import TEST_CONFIG, job_counts, snakemake

pytestmark = pytest.mark.slow  # starts processes: Snakemake, two runs trained, a checkpoint inspected

OP = "tiny/op/beta0.2/adamw/lr0.01/seed0"
PRE_LN = "tiny/pre_ln/beta1/adamw/lr0.01/seed0"


def runs_table(page: str) -> dict[str, list[str]]:
    """run_id -> the cell texts of its row in the report's table of runs."""
    rows = re.findall(r"<tr>(<td>.*?)</tr>", page_section(page, "runs"), re.S)
    cells = [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)] for row in rows]
    return {row[0]: row for row in cells}


def check_redone(work: Path, run_id: str, since: float) -> None:
    """The tables and the report were rebuilt after `since`, and show `run_id` completed with the numbers
    of the summary its job has just written."""
    results = work / "results"
    for table in ("runs.parquet", "metrics.parquet", "quant.parquet", "report.json"):
        assert (results / table).stat().st_mtime > since, table
    runs = pd.read_parquet(results / "runs.parquet").set_index("run_id")
    assert set(runs.status) == {"completed"} and (runs.steps_done == 20).all()
    summary = json.loads((results / "runs" / run_id / "summary.json").read_text())
    assert runs.loc[run_id, "tokens_per_s"] == summary["tokens_per_s"]
    assert run_id in set(pd.read_parquet(results / "quant.parquet").run_id)
    row = runs_table((work / "reports" / "index.html").read_text())[run_id]
    assert "completed" in row and f"{summary['tokens_per_s']:,.0f}" in row


def planned(out: subprocess.CompletedProcess) -> dict[str, int]:
    """The jobs of a Snakemake invocation by rule, all and total left out."""
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Job stats:" in out.stdout + out.stderr, "nothing planned:\n" + out.stderr[-2000:]
    return {rule: n for rule, n in job_counts(out.stdout + out.stderr).items() if rule not in ("all", "total")}


def test_a_deleted_run_or_checkpoint_is_done_again(tmp_path):
    pytest.importorskip("transformers")
    from tests.helpers import hf_models

    model = hf_models.save(hf_models.build("llama"), tmp_path / "models" / "tiny-llama")
    config = {**TEST_CONFIG, "inspect": {"batches": 1, "batch_size": 2, "context": 16},
              "studies": {**TEST_CONFIG["studies"], "pretrained": {"models": [{"name": str(model), "step": 100}]}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    first = snakemake(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = tmp_path / "results" / "runs"
    inspect_json = tmp_path / "results" / "checkpoints" / "tiny-llama" / "local" / "inspect.json"
    assert (runs / OP / "quant.parquet").exists() and inspect_json.exists()
    logs = tmp_path / "results" / "logs" / "train"

    # a whole run folder removed: a dry run plans exactly that run's job and what follows it, and changes
    # nothing on disk
    shutil.rmtree(runs / OP)
    untouched = {p: p.stat().st_mtime_ns for p in (runs / PRE_LN / "quant.parquet", inspect_json,
                                                   tmp_path / "results" / "report.json")}
    since = time.time()
    dry = snakemake(tmp_path, "-n")
    assert planned(dry) == {"train": 1, "aggregate": 1, "report": 1}
    assert OP in dry.stdout + dry.stderr and not (runs / OP).exists()
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched

    assert planned(snakemake(tmp_path)) == {"train": 1, "aggregate": 1, "report": 1}
    assert "[ofe] step " in (logs / f"{OP}.log").read_text()  # trained from scratch
    assert (runs / PRE_LN / "quant.parquet").stat().st_mtime_ns == untouched[runs / PRE_LN / "quant.parquet"]
    assert inspect_json.stat().st_mtime_ns == untouched[inspect_json]
    check_redone(tmp_path, OP, since)

    # only the other run's completion mark and the checkpoint's removed: both jobs run again (the run's
    # finds its final checkpoint and only quantises), nothing else
    (runs / PRE_LN / "quant.parquet").unlink()
    inspect_json.unlink()
    op_mark = (runs / OP / "quant.parquet").stat().st_mtime_ns
    since = time.time()
    assert planned(snakemake(tmp_path)) == {"train": 1, "inspect": 1, "aggregate": 1, "report": 1}
    assert "nothing to train" in (logs / f"{PRE_LN}.log").read_text()
    assert (runs / OP / "quant.parquet").stat().st_mtime_ns == op_mark
    check_redone(tmp_path, PRE_LN, since)
    checkpoints = pd.read_parquet(tmp_path / "results" / "checkpoints.parquet")
    assert list(checkpoints.status) == ["completed"] and inspect_json.stat().st_mtime > since

    # and then nothing is left to do: no rerun of the aggregation or the report every time
    again = snakemake(tmp_path, "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr

    # a mark deleted with a table: rule all requests the table, not the mark, and the aggregation that
    # runs for the table has the run trained again first
    (runs / OP / "quant.parquet").unlink()
    (tmp_path / "results" / "runs.parquet").unlink()
    assert planned(snakemake(tmp_path, "-n")) == {"train": 1, "aggregate": 1, "report": 1}
