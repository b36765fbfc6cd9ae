"""Checkpoint studies (`models:` instead of `grid:`): planning and its refusals, the aggregation of the
inspection folders, and a study of tiny saved models through the whole workflow, offline."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ofe.aggregate.runs import aggregate
from ofe.cluster.status import grid_status
from ofe.config import ConfigError, QuantConfig, build_section
from ofe.plan import plan_from_config
from ofe.plan.studies import ckpt_id, revision_step
from ofe.pretrained.inspection import Settings, inspect
from tests.helpers import hf_models
from tests.helpers.workflow import TEST_CONFIG, job_counts, snakemake

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("no_network")

SHA = {"step0": "0" * 40, "step1000": "1" * 40, "step8000": "8" * 40}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A GPT-NeoX model in a hub cache at two revisions (the later one with a planted outlier channel:
    kurtosis 1 at step 1000, 18.70 at step 8000 at layer 0) and a local Llama folder."""
    root, tok = tmp_path_factory.mktemp("models"), hf_models.tokenizer()
    early = hf_models.save(hf_models.plant_outlier(hf_models.build("gpt_neox"), 1.0), root / "early", tok)
    late = hf_models.save(hf_models.plant_outlier(hf_models.build("gpt_neox"), 10.0), root / "late", tok)
    cache = hf_models.fake_hub_cache(root / "hub", early, "ofe-test/tiny-neox",
                                     {"step0": SHA["step0"], "step1000": SHA["step1000"]})
    hf_models.fake_hub_cache(cache, late, "ofe-test/tiny-neox", {"step8000": SHA["step8000"]})
    llama = hf_models.save(hf_models.build("llama"), root / "llama-local", tok)
    return {"cache": cache, "llama": llama}


@pytest.fixture(autouse=True)
def _planning_sees_the_cache(request, monkeypatch) -> None:
    """The session is offline (tests/conftest.py), so planning checks each hub checkpoint against the
    cache a job would use (`ofe.plan.offline`): the fake one of `models`."""
    if "models" in request.fixturenames:
        monkeypatch.setenv("HF_HUB_CACHE", str(request.getfixturevalue("models")["cache"]))


def study_config(models: dict[str, Path], **extra) -> dict:
    config = copy.deepcopy(TEST_CONFIG)
    config["studies"] = {"pretrained": {
        "title": "Tiny models over training", "question": "Does kurtosis grow over training?",
        "models": [{"name": "ofe-test/tiny-neox", "revisions": ["step1000", "step8000"]},
                   {"name": str(models["llama"]), "step": 5000}]}}
    config["inspect"] = {"batches": 1, "batch_size": 2, "context": 16}
    config.update(extra)
    return config


def test_plan_lists_each_checkpoint_once_in_config_order(models):
    config = study_config(models)
    config["studies"]["again"] = {"models": [{"name": "ofe-test/tiny-neox", "revisions": ["step8000"]}]}
    plan = plan_from_config(config, None)
    got = [(c["ckpt_id"], c["revision"], c["step"], c["order"], c["studies"]) for c in plan["checkpoints"]]
    assert got == [("ofe-test--tiny-neox/step1000", "step1000", 1000, 0, ["pretrained"]),
                   ("ofe-test--tiny-neox/step8000", "step8000", 8000, 1, ["pretrained", "again"]),
                   ("llama-local/local", None, 5000, 2, ["pretrained"])]
    assert plan["runs"] == []  # a checkpoint study trains nothing
    assert plan["inspect"]["batches"] == 1 and plan["inspect"]["threads"] == 1  # a default filled in
    kinds = {s["name"]: s["kind"] for s in plan["studies"]}
    assert kinds == {"pretrained": "checkpoints", "again": "checkpoints"}


def test_checkpoint_ids_and_steps():
    assert ckpt_id("EleutherAI/pythia-160m", "step1000") == "EleutherAI--pythia-160m/step1000"
    assert ckpt_id("gpt2", None) == "gpt2/main"
    assert ckpt_id("/data/my model", None) == "my_model/local"
    assert ckpt_id("org/m", "refs/pr/1") == "org--m/refs_pr_1"
    assert [revision_step(r) for r in ("step0", "step143000", "main", None, "v1-step3")] == [0, 143000, None,
                                                                                             None, None]


@pytest.mark.parametrize("case", ["missing_folder", "no_config_json", "revisions_on_folder", "step_for_many",
                                  "twice", "collision", "both", "neither", "bad_inspect", "too_many",
                                  "grid_without_defaults", "step_conflict"])
def test_bad_checkpoint_studies_are_refused_by_key(case, models, tmp_path):
    config = study_config(models)
    entry = config["studies"]["pretrained"]["models"]
    if case == "missing_folder":
        entry[1]["name"], match = str(tmp_path / "nowhere"), r"studies.pretrained.models\[1\].name: .* is no folder"
    elif case == "no_config_json":
        (tmp_path / "empty").mkdir()
        entry[1]["name"], match = str(tmp_path / "empty"), r"models\[1\].name: .* has no config.json"
    elif case == "revisions_on_folder":
        entry[1]["revisions"], match = ["step1"], r"models\[1\].revisions: revisions name hub branches"
    elif case == "step_for_many":
        entry[0]["step"], match = 5, r"models\[0\].step: one step for 2 revisions"
    elif case == "twice":
        entry[0]["revisions"], match = ["step1000", "step1000"], r"models\[0\].revisions: .* lists a revision twice"
    elif case == "collision":  # another folder of the same name: one checkpoint folder for two models
        other = tmp_path / "x" / "llama-local"
        shutil.copytree(models["llama"], other)
        entry.append({"name": str(other)})
        match = r"models\[2\]: .* would share the folder checkpoints/llama-local/local with"
    elif case == "both":
        config["studies"]["pretrained"]["grid"] = {"block": ["op"]}
        match = r"studies.pretrained: give exactly one of \['grid', 'models'\]"
    elif case == "neither":
        del config["studies"]["pretrained"]["models"]
        match = r"studies.pretrained: give exactly one of \['grid', 'models'\]"
    elif case == "bad_inspect":
        config["inspect"]["batches"], match = 0, r"inspect.batches: 0 is less than the minimum of 1"
    elif case == "step_conflict":  # one checkpoint, two steps: which one would its figures use?
        config["studies"]["again"] = {"models": [{"name": str(models["llama"]), "step": 6000}]}
        match = r"is given step 6000 here and 5000 in studies \['pretrained'\]; give it one step"
    elif case == "grid_without_defaults":  # a checkpoint study needs no defaults; a training grid does
        del config["defaults"]
        config["studies"]["norms"] = {"grid": {"block": ["op"]}}
        match = r"defaults: required, since studies \['norms'\] train runs from it"
    else:
        config["max_runs"], match = 2, r"the grid has 3 runs \(pretrained: 3\), more than max_runs = 2"
    with pytest.raises(ConfigError, match=match):
        plan_from_config(config, Path("workflow/schemas/config.schema.yaml"))


def planned(plan: dict, **settings) -> dict:
    """`inspect`'s settings and quant section as the plan has them (`settings` overriding)."""
    measure = {k: plan["inspect"][k] for k in ("batches", "batch_size", "context")}
    return dict(settings=Settings(**{**measure, **settings}), quant=build_section(QuantConfig, plan["quant"], "quant."))


def _inspected(models: dict[str, Path], out: Path, revision: str, plan: dict, **settings) -> None:
    out.mkdir(parents=True)
    inspect(out, model="ofe-test/tiny-neox", revision=revision, cache_dir=models["cache"],
            text_file=hf_models.text_file(out), **planned(plan, **settings))


@pytest.mark.usefixtures("hub_online")  # main and v2 are not in the cache: planned as online, then missing
def test_aggregation_isolates_each_checkpoints_state(models, tmp_path, monkeypatch):
    """completed / failed / missing / corrupt (another revision's files; a truncated table), each with
    its reason, and only the completed one contributes rows, at the plan's step."""
    monkeypatch.setenv("HF_HUB_CACHE", str(models["cache"]))
    config = study_config(models)
    config["studies"]["pretrained"]["models"] = [
        {"name": "ofe-test/tiny-neox", "revisions": ["step1000", "step8000", "main", "v2", "step0"]},
        {"name": str(models["llama"])}]
    plan = plan_from_config(config, None)
    root = tmp_path / "results" / "checkpoints"
    _inspected(models, root / "ofe-test--tiny-neox/step1000", "step1000", plan)
    _inspected(models, root / "ofe-test--tiny-neox/step8000", "step1000", plan)  # the wrong revision's numbers
    _inspected(models, root / "ofe-test--tiny-neox/step0", "step0", plan, batch_size=1)  # another batch size
    (root / "ofe-test--tiny-neox/main").mkdir(parents=True)
    (root / "ofe-test--tiny-neox/main/error.txt").write_text("Traceback\nInspectError: revision 'main' is gone\n")
    shutil.copytree(root / "ofe-test--tiny-neox/step1000", root / "ofe-test--tiny-neox/v2")
    (root / "ofe-test--tiny-neox/v2/inspect.json").write_text(
        (root / "ofe-test--tiny-neox/v2/inspect.json").read_text().replace('"step1000"', '"v2"'))
    data = (root / "ofe-test--tiny-neox/v2/quant.parquet").read_bytes()
    (root / "ofe-test--tiny-neox/v2/quant.parquet").write_bytes(data[: len(data) // 2])
    frames = aggregate(plan, tmp_path / "results")
    ck = frames["checkpoints"].set_index("ckpt_id")
    assert ck.status.to_dict() == {"ofe-test--tiny-neox/step1000": "completed",
                                   "ofe-test--tiny-neox/step8000": "corrupt", "ofe-test--tiny-neox/main": "failed",
                                   "ofe-test--tiny-neox/v2": "corrupt", "llama-local/local": "missing",
                                   "ofe-test--tiny-neox/step0": "corrupt"}
    assert "not the planned 'ofe-test/tiny-neox' at 'step8000'" in ck.error["ofe-test--tiny-neox/step8000"]
    assert ck.error["ofe-test--tiny-neox/main"] == "InspectError: revision 'main' is gone"
    assert ck.error["ofe-test--tiny-neox/v2"].startswith("corrupt: quant.parquet")
    assert ck.error["ofe-test--tiny-neox/step0"] == ("corrupt: metrics.parquet: measured with batch_size 1 "
                                                     "(planned 2); rerun it")
    done = ck.loc["ofe-test--tiny-neox/step1000"]
    assert done.step == 1000 and done.architecture == "GPTNeoXForCausalLM" and done.n_layers == hf_models.LAYERS
    assert done.val_loss == pytest.approx(math.log(done.ppl_fp))
    assert pd.isna(done.super_weight_layer) and pd.isna(done.super_weight_value)  # a random model has none
    assert set(frames["checkpoint_metrics"].ckpt_id) == set(frames["checkpoint_quant"].ckpt_id) == {
        "ofe-test--tiny-neox/step1000"}
    m = frames["checkpoint_metrics"]
    assert (m.step == 1000).all()
    kurt = m[(m.metric == "kurtosis") & m.site.isin(["block_input", "unembed_input"])].set_index(["layer", "site"])
    assert kurt.value[(0, "block_input")] == pytest.approx(1.0, rel=1e-5)  # r = 1: no outlier
    assert done.max_kurtosis == kurt.value.max()
    assert done.mean_kurtosis == pytest.approx(kurt.value.xs("block_input", level="site").mean())
    for name in ("checkpoints", "checkpoint_metrics", "checkpoint_quant"):
        assert len(pd.read_parquet(tmp_path / "results" / f"{name}.parquet")) == len(frames[name])
    # `ofe status` lists the checkpoints after the runs, each in its state
    (tmp_path / "results" / "plan.json").write_text(json.dumps(plan))
    rows = {r["run_id"]: (r["status"], r["step"]) for r in grid_status(tmp_path / "results")}
    assert rows == {"checkpoints/ofe-test--tiny-neox/step1000": ("done", 1000),
                    "checkpoints/ofe-test--tiny-neox/step8000": ("corrupt", 8000),
                    "checkpoints/ofe-test--tiny-neox/main": ("failed", None),
                    "checkpoints/ofe-test--tiny-neox/v2": ("done", None),  # its tables are checked by aggregate
                    "checkpoints/llama-local/local": ("missing", None),
                    "checkpoints/ofe-test--tiny-neox/step0": ("done", 0)}  # settings: checked by aggregate


@pytest.mark.slow
def test_checkpoint_study_runs_through_the_workflow_offline(models, tmp_path, monkeypatch):
    """Three checkpoints (two hub revisions from the local cache, one local folder), one inspection job
    each through the local launcher, aggregated and reported; the planted outlier of the later revision
    shows at layer 0 as its closed form. A training study beside it still trains."""
    monkeypatch.setenv("HF_HUB_CACHE", str(models["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = study_config(models)
    config["studies"] = {"norms": {"grid": {"block": ["op"]}}, **config["studies"]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    dry = snakemake(tmp_path, "-n")
    assert dry.returncode == 0, dry.stderr
    assert job_counts(dry.stdout)["inspect"] == 3 and job_counts(dry.stdout)["train"] == 1
    res = snakemake(tmp_path)
    assert res.returncode == 0, res.stderr[-3000:] + "".join(
        p.read_text() for p in (tmp_path / "results" / "logs").rglob("*.log"))
    ck = pd.read_parquet(tmp_path / "results" / "checkpoints.parquet").set_index("ckpt_id")
    assert (ck.status == "completed").all() and ck.step.to_dict() == {
        "ofe-test--tiny-neox/step1000": 1000, "ofe-test--tiny-neox/step8000": 8000, "llama-local/local": 5000}
    assert ck.resolved_commit["ofe-test--tiny-neox/step8000"] == SHA["step8000"]
    m = pd.read_parquet(tmp_path / "results" / "checkpoint_metrics.parquet")
    layer0 = m[(m.layer == 0) & (m.site == "block_input") & (m.metric == "kurtosis")].set_index("step").value
    assert layer0[1000] == pytest.approx(1.0, rel=1e-5)
    assert layer0[8000] == pytest.approx(hf_models.planted_kurtosis(10.0), rel=1e-5)
    q = pd.read_parquet(tmp_path / "results" / "checkpoint_quant.parquet")
    assert len(q) == 3 * 2 * 2  # checkpoints x protocols x bit widths (8, 4)
    assert len(pd.read_parquet(tmp_path / "results" / "runs.parquet")) == 1
    html = Path(tmp_path / "reports" / "index.html").read_text()
    assert "Tiny models over training" in html
    again = snakemake(tmp_path, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    # resources, threads and a second study listing a checkpoint change no number: nothing reruns but
    # the plan and the tables after it
    config["inspect"].update(threads=2, mem_gb=8)
    config["studies"]["again"] = {"models": [{"name": "ofe-test/tiny-neox", "revisions": ["step8000"]}]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    counts = job_counts(snakemake(tmp_path, "-n").stdout)
    assert "inspect" not in counts and "train" not in counts and counts["plan"] == 1, counts
    # a changed inspect setting that shapes the numbers reruns the inspections only
    config["inspect"]["batch_size"] = 1
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    counts = job_counts(snakemake(tmp_path, "-n").stdout)
    assert counts["inspect"] == 3 and "train" not in counts
    assert json.loads((tmp_path / "results" / "checkpoints" / "llama-local" / "local" / "inspect.json")
                      .read_text())["step"] == 5000
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_cancel_reaches_the_inspection_jobs(tmp_path):
    """`ofe cancel` stops the checkpoint studies' jobs too, not only the training runs'."""
    import subprocess
    import sys

    from ofe.cluster.jobstate import process_start_time
    from ofe.cluster.launch import cancel

    folder = tmp_path / "results" / "checkpoints" / "org--m" / "main"
    folder.mkdir(parents=True)
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"job_id": str(job.pid), "cluster": "local", "pid": job.pid, "folder": str(folder),
                  "pid_start": process_start_time(job.pid), "stdout": str(folder / "log")}
        (folder / "job.json").write_text(json.dumps(record))
        assert cancel(tmp_path / "results", dry_run=True) == [f"local job {job.pid} ({folder})"]
        cancel(tmp_path / "results")
        assert job.wait(timeout=10) != 0  # terminated
    finally:
        job.kill()


@pytest.mark.slow  # starts a submitit job
def test_a_model_above_the_jobs_memory_fails_its_job_by_name(models, tmp_path):
    """inspect.mem_gb is the job's memory and the limit its model is checked against before any weight
    is read: a model above it fails the job with the model's name and what to change, in error.txt."""
    from ofe.cluster.launch import launch_inspect
    from ofe.plan.studies import inspect_settings

    ckpt = {"ckpt_id": "llama-local/local", "model": str(models["llama"]), "revision": None, "step": None}
    settings = inspect_settings({"inspect": {"batches": 1, "batch_size": 2, "context": 16, "mem_gb": 1e-4}})
    with pytest.raises(RuntimeError, match="inspection job .* failed"):
        launch_inspect(ckpt, tmp_path / "out", {"cluster": "local", "poll_s": 0.2}, settings,
                       {"source": "stdlib", "max_documents": 20}, {"bits": [8]})
    error = (tmp_path / "out" / "error.txt").read_text()
    assert f"{models['llama']}: " in error and "above the limit of 0.0001 GB" in error
    assert "inspect.mem_gb" in error and not (tmp_path / "out" / "inspect.json").exists()


def test_a_relative_local_folder_is_a_local_checkpoint(models, tmp_path, monkeypatch):
    """`models/llama` (one slash, like a hub name) names an existing folder: a local checkpoint, folder
    llama/local, whose inspection aggregates as completed (inspect.json records the name as written)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(models["llama"], tmp_path / "models" / "llama")
    config = study_config(models)
    config["studies"]["pretrained"]["models"] = [{"name": "models/llama"}]
    plan = plan_from_config(config, None)
    assert [(c["ckpt_id"], c["label"]) for c in plan["checkpoints"]] == [("llama/local", "llama")]
    out = tmp_path / "results" / "checkpoints" / "llama" / "local"
    inspect(out, model="models/llama", text_file=hf_models.text_file(tmp_path), **planned(plan))
    ck = aggregate(plan, tmp_path / "results")["checkpoints"]
    assert list(ck.status) == ["completed"] and ck.tokens.isna().all()  # no step, so no token count
    (tmp_path / "results" / "plan.json").write_text(json.dumps(plan))
    assert [r["status"] for r in grid_status(tmp_path / "results")] == ["done"]


def test_tokens_are_known_only_with_the_step(models, tmp_path, monkeypatch):
    """A Pythia-named model: step1000 has 1000 x 1024 x 2048 tokens; its `main` (no step in the name) has
    neither step nor tokens, not 0."""
    cache = hf_models.fake_hub_cache(tmp_path / "hub", models["llama"], "EleutherAI/pythia-ofe-test",
                                     {"main": "a" * 40, "step1000": "b" * 40})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # where planning looks (the session is offline)
    config = study_config(models)
    config["studies"]["pretrained"]["models"] = [{"name": "EleutherAI/pythia-ofe-test",
                                                  "revisions": ["main", "step1000"]}]
    plan = plan_from_config(config, None)
    for ckpt in plan["checkpoints"]:
        out = tmp_path / "results" / "checkpoints" / ckpt["ckpt_id"]
        out.mkdir(parents=True)
        inspect(out, model=ckpt["model"], revision=ckpt["revision"], text_file=hf_models.text_file(out),
                cache_dir=cache, **planned(plan))
    frames = aggregate(plan, tmp_path / "results")
    ck = frames["checkpoints"].set_index("revision")
    assert ck.status.tolist() == ["completed", "completed"]
    assert pd.isna(ck.step["main"]) and pd.isna(ck.tokens["main"])
    assert ck.step["step1000"] == 1000 and ck.tokens["step1000"] == 1000 * 1024 * 2048
    m = frames["checkpoint_metrics"].set_index("revision")
    assert m.tokens["main"].isna().all() and (m.tokens["step1000"] == 1000 * 1024 * 2048).all()
