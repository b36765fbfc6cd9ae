"""The memory plan of a grid (ofe/plan/memplan.py): printed by `python -m ofe check-config` and by the
workflow at start, and a run that would not fit its process's memory refused before any job, naming
the scale and the knobs that change it."""

from __future__ import annotations

import copy
import dataclasses
import math
import subprocess
from pathlib import Path

import pytest
import yaml

from ofe.__main__ import main
from ofe.config import ConfigError
from ofe.plan import grid, memory, memplan, presets
from tests.helpers import REPO
from tests.helpers.workflow import SNAKEMAKE

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
SLURM_LAUNCHER = REPO / "profiles" / "slurm" / "launcher.yaml"
KNOBS = ("train.micro_batch_size", "tasks_per_node", "nodes", "train.parallel: fsdp")


@pytest.fixture
def config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def one_study(config: dict, **grid_axes) -> dict:
    config = copy.deepcopy(config)
    config["studies"] = {"s": {"grid": {k: list(v) for k, v in grid_axes.items()}}}
    return config


def check_config(tmp_path: Path, config: dict, capsys, *args: str) -> tuple[int, str, str]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["check-config", str(path), "--schema", str(SCHEMA), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_preset_prints_a_plan_and_fits_on_the_slurm_profile(tmp_path, config, capsys):
    config = one_study(config, scale=presets.SCALES, block=["pre_ln", "op"])
    code, out, err = check_config(tmp_path, config, capsys, "--launcher-file", str(SLURM_LAUNCHER))
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in presets.SCALES]
    assert [r[0] for r in rows] == list(presets.SCALES)  # one row per scale (one optimiser, one set-up)
    assert all(r[-1] == "ok" for r in rows)
    by_scale = {r[0]: r for r in rows}
    assert by_scale["7b"][2:5] == ["fsdp", "8", "8"] and by_scale["1.2b"][2:5] == ["fsdp", "8", "8"]
    assert by_scale["tiny"][-3:] == ["2.00G", "CPU", "ok"] and by_scale["7b"][-3:] == ["80.00G", "GPU", "ok"]


def test_sharded_presets_fall_back_to_ddp_for_whole_matrix_optimisers(config):
    runs = grid.expand(one_study(config, scale=["1.2b", "7b"], optimizer=["adamw", "soap", "muon"]), SCHEMA)
    parallel = {(r.grid["scale"], r.grid["optimizer"]): (r.config.train.parallel, r.config.train.micro_batch_size)
                for r in runs.values()}
    assert parallel[("1.2b", "adamw")] == ("fsdp", None) and parallel[("7b", "adamw")] == ("fsdp", None)
    assert parallel[("1.2b", "soap")] == ("ddp", 4) and parallel[("7b", "muon")] == ("ddp", None)
    # config.yaml's own choice wins: ddp for adamw stays ddp, fsdp for soap is refused by name
    config["defaults"]["train"]["parallel"] = "ddp"
    runs = grid.expand(one_study(config, scale=["7b"]), SCHEMA)
    assert {r.config.train.parallel for r in runs.values()} == {"ddp"}
    config["defaults"]["train"]["parallel"] = "fsdp"
    with pytest.raises(ConfigError, match="'soap' cannot run with train.parallel: fsdp"):
        grid.expand(one_study(config, scale=["7b"], optimizer=["soap"]), SCHEMA)


ONE_GPU = {"cluster": "slurm", "scales": {"7b": {"gpus_per_node": 1, "tasks_per_node": 1, "gpu_mem_gb": 80}}}


def test_7b_on_one_80gb_gpu_with_ddp_and_adamw_is_refused_naming_the_knobs(config):
    """16 bytes per parameter (weight, gradient, two AdamW moments) of 6.5B parameters is 104 GB: no
    micro-batch makes one 80 GB GPU hold it; sharding over 2 or more processes does."""
    config["defaults"]["train"]["parallel"] = "ddp"
    runs = grid.expand(one_study(config, scale=["7b"]), SCHEMA)
    rows = memplan.plan(runs.values(), ONE_GPU)
    assert len(rows) == 1 and not rows[0].fits
    n = sum(math.prod(s) for _, s in memory.param_shapes(rows[0].sections[0]))
    assert rows[0].estimate.total > 16 * n > 80e9
    with pytest.raises(ConfigError) as err:
        memplan.check(rows)
    message = str(err.value)
    assert "scale '7b'" in message and "launcher.scales.7b.gpu_mem_gb" in message
    for knob in KNOBS:
        assert knob in message
    fixes = message.split("fits with: ")[1]
    assert "train.micro_batch_size: " not in fixes  # no micro-batch shrinks 104 GB of static memory
    procs = int(fixes.split(" processes with train.parallel: fsdp")[0].split()[-1])
    m, o, t = rows[0].sections
    sharded = dataclasses.replace(t, parallel="fsdp")
    assert memory.estimate(m, o, sharded, procs, True).total <= 80e9  # it fits there
    assert memory.estimate(m, o, sharded, procs // 2, True).total > 80e9  # and not on half as many


def test_a_micro_batch_that_fits_is_named(config):
    """350m on one GPU with a 64-sequence batch needs 44 GB of activations; lowering gpu_mem_gb to 24
    makes the whole batch too big, and the plan names a micro-batch that fits."""
    launcher = {"cluster": "slurm", "scales": {"350m": {"gpus_per_node": 1, "gpu_mem_gb": 24}}}
    rows = memplan.plan(grid.expand(one_study(config, scale=["350m"]), SCHEMA).values(), launcher)
    with pytest.raises(ConfigError) as err:
        memplan.check(rows)
    fix = str(err.value).split("fits with: ")[1]
    mb = int(fix.split("train.micro_batch_size: ")[1].split(";")[0])
    m, o, t = rows[0].sections
    fits = memory.estimate(m, o, dataclasses.replace(t, micro_batch_size=mb), 1, True)
    assert fits.total <= 24e9 and mb < 64


def test_check_config_exits_2_and_prints_the_plan_before_the_refusal(tmp_path, config, capsys):
    config["defaults"]["train"]["parallel"] = "ddp"
    config = one_study(config, scale=["7b"])
    (tmp_path / "one-gpu.yaml").write_text(yaml.safe_dump(ONE_GPU))
    code, out, err = check_config(tmp_path, config, capsys, "--launcher-file", str(tmp_path / "one-gpu.yaml"))
    assert code == 2
    assert "TOO BIG" in out and "ofe: configuration error:" in err
    for knob in KNOBS:
        assert knob in err


def test_configfiles_merge_over_the_config_as_snakemake_does(tmp_path, config, capsys):
    (tmp_path / "over.yaml").write_text(yaml.safe_dump({"defaults": {"train": {"steps": 7}},
                                                        "studies": {"s": {"grid": {"scale": ["small"]}}}}))
    config["studies"] = {}
    code, out, err = check_config(tmp_path, config, capsys, "--configfile", str(tmp_path / "over.yaml"))
    assert code == 0, err
    assert "small/pre_ln/beta1/adamw/lr0.01/seed0" in out


def test_memory_limits_by_device():
    launcher = {"cluster": "slurm", "gpu_mem_gb": 40,
                "scales": {"7b": {"gpu_mem_gb": 141}, "small": {"mem_gb": 8, "tasks_per_node": 4}}}
    assert memplan.memory_limit(launcher, "7b", True).bytes == 141 * 10**9
    assert memplan.memory_limit(launcher, "1.2b", True).bytes == 40 * 10**9  # the launcher's own
    assert memplan.memory_limit({"cluster": "slurm"}, "1.2b", True).bytes == 80 * 10**9  # the default
    assert memplan.memory_limit(launcher, "small", False).bytes == 2 * 10**9  # the node's, per task
    assert memplan.memory_limit({"cluster": "local"}, "tiny", False).bytes == memplan.machine_memory()
    assert memplan.processes({"cluster": "slurm", "scales": {"7b": {"tasks_per_node": 8, "nodes": 2}}}, "7b") == 16
    assert memplan.processes({"cluster": "local", "tasks_per_node": 2, "nodes": 4}, "tiny") == 2


def test_a_micro_batch_that_does_not_divide_a_process_share_is_refused_at_plan_time(config):
    config["defaults"]["train"]["micro_batch_size"] = 4  # tiny: batch 16, so 2 per process over 8
    runs = grid.expand(one_study(config, block=["pre_ln"]), SCHEMA)
    with pytest.raises(ConfigError) as err:
        memplan.plan(runs.values(), {"cluster": "local", "tasks_per_node": 8})
    assert "scale 'tiny' runs on 8 processes" in str(err.value)
    assert "train.micro_batch_size: 4 does not divide the per-process batch of 2" in str(err.value)




def test_the_workflow_prints_the_plan_and_refuses_before_any_job(tmp_path, config):
    config["defaults"]["train"]["parallel"] = "ddp"
    config = one_study(config, scale=["tiny", "7b"], block=["op"])
    config["launcher"] = {"cluster": "local", "scales": ONE_GPU["scales"]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "-n",
                          "--configfile", str(tmp_path / "config.yaml")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)
    assert out.returncode != 0
    assert "ofe: memory tiny adamw ddp x1 micro-batch 16:" in out.stderr  # the compact plan
    assert "ofe: configuration error:" in out.stderr and "scale '7b'" in out.stderr
    for knob in KNOBS:
        assert knob in out.stderr
    assert not (tmp_path / "results").exists()
