"""config.yaml's `tracking:` section: refused before any job with the key and the allowed values, resolved
with its defaults, and no part of any run's identity."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ofe.config import ConfigError
from ofe.plan import grid, plan_from_config
from ofe.plan.tracking import default_project, tracking_settings
from tests.helpers import REPO

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture
def config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


@pytest.mark.parametrize("tracking, expected", [
    ({"backend": "wandbb"}, ["tracking.backend", "'wandbb'", "['none', 'wandb', 'mlflow']"]),
    ({"backend": "wandb", "mode": "cloud"}, ["tracking.mode", "'cloud'", "['offline', 'online']"]),
    ({"backend": "wandb", "projekt": "x"}, ["tracking", "unknown key 'projekt'", "'project'"]),
    ({"backend": "mlflow", "mode": "online"}, ["tracking.mode: only for backend 'wandb'"]),
    ({"backend": "wandb", "tracking_uri": "file:///x"}, ["tracking.tracking_uri: only for backend 'mlflow'"]),
    ({"backend": "mlflow", "project": ""}, ["tracking.project"]),
])
def test_a_bad_tracking_section_is_refused_by_name(config, tracking, expected):
    config["tracking"] = tracking
    with pytest.raises(ConfigError) as err:
        grid.validate(config, SCHEMA)
    assert all(part in str(err.value) for part in expected), str(err.value)


def test_settings_are_resolved_with_their_defaults(config):
    assert tracking_settings(config) == {"backend": "none"}
    config["tracking"] = {"backend": "mlflow"}
    assert tracking_settings(config) == {"backend": "mlflow", "project": "ofe",
                                         "tracking_uri": (Path("results").resolve() / "mlruns").as_uri()}
    config.update(results_dir="results/osp", tracking={"backend": "wandb", "mode": "online"})
    assert tracking_settings(config) == {"backend": "wandb", "project": "ofe-osp", "mode": "online",
                                         "dir": str(Path("results/osp").resolve())}
    assert default_project("/scratch/me/abl") == "ofe-abl"


def test_tracking_changes_no_runs_identity(config):
    """The same plan, run for run, with tracking off and on: no config hash moves, so finished runs stay
    finished (the pinned hashes of tests/unit/config/test_config_hash.py hold as they are)."""
    from ofe.config import config_hash

    off = plan_from_config(config, SCHEMA)
    config["tracking"] = {"backend": "wandb", "project": "p"}
    on = plan_from_config(config, SCHEMA)
    assert [(r["run_id"], config_hash(r["config"])) for r in off["runs"]] == \
           [(r["run_id"], config_hash(r["config"])) for r in on["runs"]]
    assert [r["config"] for r in off["runs"]] == [r["config"] for r in on["runs"]]
