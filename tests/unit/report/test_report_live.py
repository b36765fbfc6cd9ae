"""`ofe report --live` mid-sweep: finished runs reported, a run in progress counted as unfinished, the
workflow's completion mark and Snakemake's metadata untouched."""

from __future__ import annotations

import json

import pandas as pd

from ofe.__main__ import main
from ofe.io import METRIC_SCHEMA, write_parquet


def _run(run_id: str, block: str) -> dict:
    grid = {"scale": "tiny", "block": block, "beta": 1.0, "optimizer": "adamw", "lr": 0.01, "seed": 0}
    return {"run_id": run_id, "grid": grid, "studies": ["norms"]}


def _finished(folder, val_loss: float) -> None:
    folder.mkdir(parents=True)
    rows = [(s, s * 16, layer, "block_input", "kurtosis", 1.0 + s / 10 + layer) for s in (0, 10) for layer in (0, 1)]
    rows += [(10, 160, -1, "val", "loss", val_loss), (10, 160, -1, "train", "loss", val_loss + 0.1)]
    write_parquet(pd.DataFrame(rows, columns=METRIC_SCHEMA.names), folder / "metrics.parquet", METRIC_SCHEMA)
    (folder / "summary.json").write_text(json.dumps({"status": "completed", "final_val_loss": val_loss,
                                                     "steps_done": 10, "wall_s": 3.0, "tokens_per_s": 100.0}))


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_live_report_mid_sweep(tmp_path, capsys):
    results, runs = tmp_path / "results", tmp_path / "results" / "runs"
    ids = ["tiny/pre_ln/s0", "tiny/op/s0", "tiny/post_ln/s0"]
    _finished(runs / ids[0], 3.4567)
    _finished(runs / ids[1], 2.9876)
    running = runs / ids[2]  # in progress: a checkpoint and the launcher's job.json only
    (running / "checkpoints").mkdir(parents=True)
    (running / "checkpoints" / "checkpoint.pt").write_bytes(b"\0" * 16)
    (running / "job.json").write_text(json.dumps({"job_id": "123", "cluster": "local"}))
    plan = {"runs": [_run(ids[0], "pre_ln"), _run(ids[1], "op"), _run(ids[2], "post_ln")],
            "grid_columns": ["scale", "block", "beta", "optimizer", "lr", "seed"],
            "studies": [{"name": "norms", "title": "Norms", "question": "OP?", "axes": ["block"]}],
            "config": {"results_dir": str(results), "report": str(tmp_path / "reports" / "index.html")}}
    smk = tmp_path / ".snakemake"
    (smk / "metadata").mkdir(parents=True)
    (smk / "metadata" / "x").write_text("{}")
    before = _snapshot(smk)

    # before the plan exists: a clear message, no report
    config = tmp_path / "config.yaml"
    config.write_text(f"results_dir: {results}\nreport: {tmp_path / 'reports' / 'index.html'}\n")
    assert main(["report", "--live", "--config", str(config), "--no-png"]) == 2
    assert "start the sweep first" in capsys.readouterr().err

    (results / "plan.json").write_text(json.dumps(plan))
    assert main(["report", "--live", "--config", str(config), "--no-png"]) == 0
    page = tmp_path / "reports" / "index-partial.html"
    html = page.read_text()
    assert "<b>Partial results:</b> 1 of 3 runs have no results (1 missing)" in html
    assert '"value": 3.4567' in html and '"value": 2.9876' in html  # the finished runs' validation losses
    assert not (results / "report.json").exists() and not (tmp_path / "reports" / "index.html").exists()
    assert not (results / "runs.parquet").exists()  # the workflow's own tables untouched
    assert (results / "partial" / "runs.parquet").exists()
    statuses = pd.read_parquet(results / "partial" / "runs.parquet").set_index("run_id").status.to_dict()
    assert statuses == {ids[0]: "completed", ids[1]: "completed", ids[2]: "missing"}
    assert _snapshot(smk) == before
