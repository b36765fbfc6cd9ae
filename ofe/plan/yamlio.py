"""Config files read strictly: YAML (or JSON), with a key given twice in one mapping refused (PyYAML, and
Snakemake's `configfile:`, silently keep the last value, so a duplicated `lr:` would change a run unseen)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ofe.config import ConfigError


class StrictLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (PyYAML, and Snakemake's
    `configfile:`, silently keep the last value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            seen[key] = key_node.start_mark.line
            if first is not None:
                raise ConfigError(f"{key_node.start_mark.name} line {key_node.start_mark.line + 1}: duplicate "
                                  f"key {key!r} (first on line {first + 1}); give each key once")
        return super().construct_mapping(node, deep)


def load_config(path: Path | str) -> Any:
    """Read a YAML (or JSON) config file strictly: a duplicate key or a syntax error is a ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
