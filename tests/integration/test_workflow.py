"""The Snakemake workflow: dry-run plans the expected jobs; a 2-run grid runs end to end (local)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ofe.io import read_metadata
from tests.helpers import REPO
from tests.helpers.workflow import TEST_CONFIG, job_counts, snakemake

pytestmark = pytest.mark.slow  # starts processes: Snakemake, and a grid trained end to end


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TEST_CONFIG))
    return tmp_path


def test_dry_run_lists_one_job_per_unique_run(workdir):
    out = snakemake(workdir, "-n")
    assert out.returncode == 0, out.stderr
    counts = job_counts(out.stdout + out.stderr)
    assert counts["train"] == 2  # the union: the `seeds` study adds no run; each job also quantises
    assert "quantise" not in counts
    assert counts["prepare_data"] == 1 and counts["aggregate"] == 1 and counts["report"] == 1
    assert "tiny/op/beta0.2/adamw/lr0.01/seed0" in out.stdout + out.stderr


def test_dry_run_of_default_config_plans_every_study(tmp_path):
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    out = snakemake(tmp_path, "-n")
    assert out.returncode == 0, out.stderr
    # by hand: norms 7 blocks; beta +3 (0.1, 0.5, 1); lr +2 (3e-3 for pre_ln, op); eps 3 values x 2
    # seeds, one shared (+5); optimizers +2 (soap for pre_ln, op); adafactor +2; muon +2
    assert job_counts(out.stdout + out.stderr)["train"] == 7 + 3 + 2 + 5 + 2 + 2 + 2


def test_bad_config_stops_before_any_job(workdir):
    bad = dict(TEST_CONFIG, studies={"norms": {"grid": {"block": ["pre_ln", "post_lm"]}}})
    (workdir / "config.yaml").write_text(yaml.safe_dump(bad))
    out = snakemake(workdir)
    assert out.returncode != 0
    assert "studies.norms.grid.block[1]: 'post_lm' is not one of" in out.stderr
    assert not (workdir / "results").exists()


def test_two_run_grid_end_to_end(workdir):
    out = snakemake(workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    report = workdir / "reports" / "index.html"
    assert report.exists()
    page = report.read_text()
    assert 'src="http' not in page and "tiny/op/beta0.2/adamw/lr0.01/seed0" in page

    runs = pd.read_parquet(workdir / "results" / "runs.parquet")
    assert sorted(runs.run_id) == ["tiny/op/beta0.2/adamw/lr0.01/seed0", "tiny/pre_ln/beta1/adamw/lr0.01/seed0"]
    assert set(runs.status) == {"completed"}
    assert (runs.steps_done == 20).all()
    op = runs.set_index("block").loc["op"]
    assert sorted(op.studies) == ["norms", "seeds"] and op.beta == pytest.approx(0.2)

    metrics = pd.read_parquet(workdir / "results" / "metrics.parquet")
    assert set(metrics.run_id) == set(runs.run_id)
    k = metrics[(metrics.metric == "kurtosis") & (metrics.site == "block_input")]
    assert set(k.layer) == {0, 1} and sorted(k.step.unique()) == [0, 5, 10, 15, 20]
    assert ((k.value >= 1 - 1e-6) & (k.value <= 32)).all()
    assert set(metrics.block) == {"pre_ln", "op"}

    quant = pd.read_parquet(workdir / "results" / "quant.parquet")
    assert len(quant) == 2 * 2 * 2  # runs x protocols x bits
    assert set(quant.protocol) == {"static_per_tensor", "dynamic_per_token"}
    assert (quant.ppl_fp > 1).all() and quant.mean_kurtosis.between(1, 32).all()

    meta = read_metadata(workdir / "results" / "runs.parquet")
    assert [s["name"] for s in meta["studies"]] == ["norms", "seeds"]
    assert meta["provenance"]["libraries"]["snakemake"]
    run_dir = workdir / "results" / "runs" / "tiny" / "op" / "beta0.2" / "adamw" / "lr0.01" / "seed0"
    assert json.loads((run_dir / "config.json").read_text())["model"]["qk_norm"] == "rms"
    assert (workdir / "results" / "logs" / "train" / "tiny" / "op" / "beta0.2" / "adamw" / "lr0.01" / "seed0.log").exists()

    # a second invocation has nothing to do
    again = snakemake(workdir, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr

    # changing only the quant settings reruns only the quantisation: no training step is taken again
    before = pd.read_parquet(run_dir / "metrics.parquet")
    (workdir / "config.yaml").write_text(yaml.safe_dump({**TEST_CONFIG, "quant": {**TEST_CONFIG["quant"], "bits": [6]}}))
    rerun = snakemake(workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = (workdir / "results" / "logs" / "train" / "tiny" / "op" / "beta0.2" / "adamw" / "lr0.01" / "seed0.log").read_text()
    assert "nothing to train" in log and "[ofe] step " not in log
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "metrics.parquet"), before)
    quant = pd.read_parquet(workdir / "results" / "quant.parquet")
    assert sorted(quant.bits.unique()) == [6] and len(quant) == 2 * 2

    # a run added to the grid after a finished workflow is trained and the tables rebuilt with it: the
    # aggregation's input list changed, so a report without the new run is never taken as up to date
    grown = {**TEST_CONFIG, "quant": {**TEST_CONFIG["quant"], "bits": [6]},
             "studies": {**TEST_CONFIG["studies"], "seeds": {"grid": {"block": ["op"], "seed": [0, 1]}}}}
    (workdir / "config.yaml").write_text(yaml.safe_dump(grown))
    counts = job_counts(snakemake(workdir, "-n").stdout)
    assert counts["train"] == 1 and counts["aggregate"] == 1 and counts["report"] == 1
