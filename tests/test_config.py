"""Bad configuration fails early, naming the key and the allowed values; the grid expands as planned."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from ofe import grid, presets
from ofe.config import ConfigError, ModelConfig, OptimConfig, RunConfig
from tests.conftest import REPO

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture
def config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_default_config_expands_to_the_union_of_its_studies(config):
    runs = grid.expand(config, SCHEMA)
    ids = list(runs)
    assert len(ids) == len(set(ids))
    shared = runs["tiny/op/beta0.2/adamw/lr0.01/seed0"]
    assert {"norms", "beta", "lr"} <= set(shared.studies)  # one run serves several studies
    assert shared.config.model.qk_norm == "rms" and shared.config.model.final_norm == "none"
    assert runs["tiny/pre_ln/beta1/adamw/lr0.003/seed0"].config.optim.lr == pytest.approx(3e-3)
    assert {r.grid["block"] for r in runs.values()} == set(presets.BLOCKS)


def test_schema_enumerations_match_the_presets():
    schema = yaml.safe_load(SCHEMA.read_text())
    assert schema["$defs"]["block"]["enum"] == list(presets.BLOCKS)
    assert schema["$defs"]["scale"]["enum"] == list(presets.SCALES)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c["studies"]["norms"]["grid"].__setitem__("block", ["pre_lnn"]),
         ["studies.norms.grid.block[0]", "'pre_lnn' is not one of", "'pre_ln'", "'op'"]),
        (lambda c: c["studies"]["lr"]["grid"].__setitem__("lrr", [0.1]),
         ["studies.lr.grid: unknown key 'lrr'", "allowed keys are", "'lr'", "optim.eps"]),
        (lambda c: c["defaults"].__setitem__("scale", "huge"),
         ["defaults.scale", "'huge' is not one of", "'tiny'"]),
        (lambda c: c["defaults"].__setitem__("lr", "1e-2"),
         ["defaults.lr", "'1e-2' is not of type 'number'"]),
        (lambda c: c["defaults"]["optim"].__setitem__("decay", "cosinus"),
         ["optim.decay", "'cosinus'", "'cosine'", "'linear'"]),
        (lambda c: c["defaults"]["model"if "model" in c["defaults"] else "train"].__setitem__("stepz", 3),
         ["stepz", "unknown key", "'steps'"]),
        (lambda c: c["studies"]["beta"]["grid"].__setitem__("optim.epz", [1e-8]),
         ["optim.epz", "sweepable keys", "optim.eps"]),
    ],
)
def test_bad_config_is_rejected_with_key_and_allowed_values(config, mutate, expected):
    bad = copy.deepcopy(config)
    mutate(bad)
    with pytest.raises(ConfigError) as err:
        grid.expand(bad, SCHEMA)
    for fragment in expected:
        assert fragment in str(err.value)


def test_dataclass_validation_names_field_and_choices():
    with pytest.raises(ConfigError, match=r"model.norm: 'batchnorm' is not allowed; choose one of \['layernorm'"):
        ModelConfig(norm="batchnorm")
    with pytest.raises(ConfigError, match="model.d_model: 30 is not divisible by n_head=4"):
        ModelConfig(d_model=30, n_head=4)
    with pytest.raises(ConfigError, match="optim.lr: must be > 0"):
        OptimConfig(lr=0)


def test_run_config_round_trips_through_json():
    cfg = RunConfig(model=ModelConfig(norm="srms", logit_cap=30.0), grid={"block": "x"})
    import json

    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_extra_axis_joins_the_run_path_only_where_it_changes_the_run(config):
    config["studies"] = {"norms": {"grid": {"block": ["pre_ln", "op"]}},
                         "eps": {"grid": {"block": ["pre_ln"], "optim.eps": [1.0e-8, 1.0e-4]}}}
    runs = grid.expand(config, SCHEMA)
    assert len(runs) == 3
    base = runs["tiny/pre_ln/beta1/adamw/lr0.01/seed0"]  # eps 1e-8 is the default: the same run
    assert base.studies == ["norms", "eps"]
    assert runs["tiny/pre_ln/beta1/adamw/lr0.01/seed0_optim.eps0.0001"].config.optim.eps == 1e-4
    # every run carries the extra column, with the value its config has
    assert {r.grid["optim.eps"] for r in runs.values()} == {1e-8, 1e-4}


def test_check_config_cli_exits_2_with_the_message(tmp_path, config):
    config["studies"]["norms"]["grid"]["block"] = ["pre_ln", "opp"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "ofe", "check-config", str(path), "--schema", str(SCHEMA)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert "studies.norms.grid.block[1]: 'opp' is not one of" in out.stderr
