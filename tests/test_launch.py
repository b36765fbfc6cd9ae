"""submitit launch (local executor): the job's result comes back; a failing job fails with its traceback."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from ofe.launch import launch
from tests.conftest import tiny_run

LOCAL = {"cluster": "local", "poll_s": 0.2, "timeout_min": 5}


def test_local_launch_trains_and_records_the_job(data_dir, tmp_path, capsys):
    summary = launch(tiny_run(data_dir, train={"steps": 4}), tmp_path, LOCAL)
    assert summary["status"] == "completed"
    assert json.loads((tmp_path / "summary.json").read_text())["steps_done"] == 4
    job = json.loads((tmp_path / "job.json").read_text())
    assert job["cluster"] == "local" and job["job_id"]
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 4
    assert "[ofe] step 4/4" in capsys.readouterr().out  # the job's progress reaches the rule's log


def test_failing_job_raises_with_its_traceback(tmp_path):
    cfg = replace(tiny_run(tmp_path / "nowhere"), data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match="failed") as err:
        launch(cfg, tmp_path / "run", LOCAL)
    assert "meta.json is missing" in str(err.value)
    assert "meta.json is missing" in (tmp_path / "run" / "error.txt").read_text()
    assert not (tmp_path / "run" / "summary.json").exists()
