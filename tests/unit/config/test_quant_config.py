"""The quant section's protocols: torchao_dynamic is opt-in, 8 bits only, and refused when the config is read
(check-config, the workflow's plan) where torchao is missing or too old, with the command that installs it."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import yaml

from ofe.config import PROTOCOLS, SIMULATED, ConfigError, QuantConfig, build_section
from ofe.config import quant as quant_config
from ofe.plan import grid, plan_from_config
from tests.helpers import REPO

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture
def config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_the_default_stays_the_two_simulated_protocols(config):
    assert QuantConfig().protocols == SIMULATED == ("static_per_tensor", "dynamic_per_token")
    assert "torchao_dynamic" not in config["quant"]["protocols"]  # opt-in: the default grid does not use it
    schema = yaml.safe_load(SCHEMA.read_text())
    assert schema["properties"]["quant"]["properties"]["protocols"]["items"]["enum"] == list(PROTOCOLS)


def test_an_unknown_protocol_names_its_key_and_the_allowed_values():
    with pytest.raises(ConfigError) as err:
        build_section(QuantConfig, {"protocols": ["static_per_tensor", "torchao"]}, "quant.")
    assert str(err.value) == ("quant.protocols[1]: 'torchao' is not allowed; choose from "
                              "['static_per_tensor', 'dynamic_per_token', 'torchao_dynamic']")


def test_torchao_is_measured_at_8_bits_only_and_refused_without_8():
    cfg = QuantConfig(protocols=("static_per_tensor", "torchao_dynamic"), bits=(8, 6))
    assert cfg.pairs() == [("static_per_tensor", 8), ("static_per_tensor", 6), ("torchao_dynamic", 8)]
    with pytest.raises(ConfigError, match=r"'torchao_dynamic' runs torchao's int8 kernels, 8 bits only, but "
                                          r"quant.bits is \[6, 4\]"):
        QuantConfig(protocols=("torchao_dynamic",), bits=(6, 4))


@pytest.fixture
def no_torchao(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchao looks uninstalled to the config check (the real find_spec answers for everything else)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(quant_config.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao" else real(name, *a))


@pytest.mark.usefixtures("no_torchao")
def test_torchao_missing_fails_at_check_config_and_planning_with_the_install_command(config):
    config["quant"]["protocols"] = ["dynamic_per_token", "torchao_dynamic"]
    for check in (lambda: grid.validate(config, SCHEMA), lambda: plan_from_config(config, SCHEMA)):
        with pytest.raises(ConfigError) as err:
            check()
        message = str(err.value)
        assert "quant.protocols: 'torchao_dynamic' needs torchao >= 0.18 and torchao is not installed" in message
        assert "pip install -e '.[int8]'" in message
    config["quant"]["protocols"] = ["dynamic_per_token"]  # the simulated ones need nothing more
    assert plan_from_config(config, SCHEMA)["quant"]["protocols"] == ("dynamic_per_token",)


def test_an_older_torchao_is_refused(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(quant_config.importlib.metadata, "version",
                        lambda name: "0.17.1" if name == "torchao" else real(name))
    with pytest.raises(ConfigError, match="torchao 0.17.1 is installed, older than 0.18"):
        QuantConfig(protocols=("torchao_dynamic",))


def test_torchao_installed_passes():
    """The dev extra installs torchao (no test may skip in CI): here it is found, and new enough."""
    assert quant_config.torchao_missing() is None
    assert QuantConfig(protocols=("torchao_dynamic",)).pairs() == [("torchao_dynamic", 8)]
