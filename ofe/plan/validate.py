"""Everything about config.yaml that can be checked before a single run is expanded or a job starts.

- Numbers as users write them: YAML 1.1 reads `1e-2` as a string; a numeric string where a number
  belongs is read as that number, any other string there is refused by name.
- No inf or nan anywhere; the JSON schema (workflow/schemas/config.schema.yaml); safe results and
  report paths; every default and grid value checked at its key against the config dataclasses; the
  grid's size, as a product, before expanding it (`max_runs`).
- `tracking`: the schema, and no key of the other backend (`ofe.plan.tracking`).
- The launcher (config.yaml's `launcher` updated from a profile's `launcher_file`), checked by the
  same schema, and every run's batch against its number of processes.
- YAML files read strictly (`ofe.plan.yamlio`): a key given twice is refused.
Every message names the key and what is allowed.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import yaml

from ofe.config import (ConfigError, DataConfig, QuantConfig, build_section, check_field, field_kind,
                        number_from_text, section_fields)
from ofe.plan import studies
from ofe.plan.tracking import check_tracking

AXES = ("scale", "block", "beta", "optimizer", "lr", "seed")  # in run-path order
SECTIONS = ("model", "optim", "train")
AXIS_FIELDS = {"lr": ("optim", "lr"), "beta": ("model", "beta"), "seed": ("train", "seed")}
DEFAULT_SCHEMA = Path("workflow/schemas/config.schema.yaml")
MAX_RUNS = 20_000  # config.yaml's top-level `max_runs` raises it
SAFE_SEGMENT = re.compile(r"[A-Za-z0-9._,+=-]+")  # a run folder name: no spaces, quotes, ':', '/'
SAFE_PATH = re.compile(r"(?!-)(?!.*/-)[A-Za-z0-9_./-]+")  # results_dir, report: no part an option ('-x')
TOKENIZER_VOCAB = {"bytes": 256}  # tokenizers whose vocabulary is known without loading them


def format_value(value: Any) -> str:
    """A grid value as it appears in a run folder name: exact and stable. Floats by their shortest
    round-trip repr without a trailing '.0' (1e-2 -> 0.01, 1.0 -> 1), lists joined with ','."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    return str(value)


def folder_segment(text: str, what: str) -> str:
    """`text` if it is safe as one folder name, else ConfigError naming `what` (the axis)."""
    if not SAFE_SEGMENT.fullmatch(text) or text in (".", ".."):
        raise ConfigError(f"{what}: {text!r} cannot be part of a run folder name; use only letters, "
                          f"digits and . _ , + = - (not '.' or '..' alone)")
    return text

def _json_path(path: Iterable) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


@functools.lru_cache(maxsize=8)
def load_schema(schema_path: str) -> dict:
    return yaml.safe_load(Path(schema_path).read_text())


def schema_errors(schema: dict, instance: Any, prefix: tuple = ()) -> list[str]:
    """Every violation of `schema`, as 'dotted.key: what is wrong and what is allowed'."""
    validator = jsonschema.Draft202012Validator(schema)
    lines = []
    for e in sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path]):
        msg = e.message
        if e.validator == "additionalProperties":
            allowed = sorted(e.schema.get("properties", {}))
            patterns = list(e.schema.get("patternProperties", {}))
            unknown = [k for k in e.instance
                       if k not in allowed and not any(re.search(p, k) for p in patterns)]
            msg = f"unknown key {', '.join(map(repr, unknown))}; allowed keys are {allowed}"
            if patterns:
                msg += " or a dotted config key such as 'optim.eps' (model.*, optim.*, train.*)"
        elif "propertyNames" in e.relative_schema_path and e.validator == "enum":  # launcher.scales
            msg = f"unknown key {e.instance!r}; allowed keys are {e.validator_value}"
        elif "propertyNames" in e.relative_schema_path:  # a study's name
            msg = f"name {e.instance!r} is not allowed; use only letters, digits, '_' and '-'"
        elif e.validator == "oneOf":  # a study: a training grid or a list of checkpoints
            msg = f"give exactly one of {[s['required'][0] for s in e.validator_value]}"
        lines.append(f"{_json_path((*prefix, *e.absolute_path))}: {msg}")
    return lines


def validate_schema(config: dict, schema_path: Path | str = DEFAULT_SCHEMA) -> None:
    """Check config.yaml against the JSON schema; the error names the key and the allowed values."""
    lines = schema_errors(load_schema(str(schema_path)), config)
    if lines:
        raise ConfigError("\n".join(f"config.yaml: {line}" for line in lines))


# ---- numbers as users write them -------------------------------------------------------------------

def _schema_kind(node: dict, root: dict) -> type | None:
    """int or float if the schema node admits a number, else None."""
    node = _resolve(node, root)
    types_ = node.get("type", [])
    types_ = [types_] if isinstance(types_, str) else types_
    enum = node.get("enum", [None])
    if "integer" in types_ or all(type(v) is int for v in enum):  # quant.bits: enum [4, 6, 8]
        return int
    if "number" in types_:
        return float
    for alt in node.get("oneOf", []) + node.get("anyOf", []):
        if kind := _schema_kind(alt, root):
            return kind
    return None


def _resolve(node: Any, root: dict) -> dict:
    while isinstance(node, dict) and "$ref" in node:
        node = root["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node if isinstance(node, dict) else {}


def _child(node: dict, key: str) -> dict:
    if key in node.get("properties", {}):
        return node["properties"][key]
    for pattern, sub in node.get("patternProperties", {}).items():
        if re.search(pattern, key):
            return sub
    extra = node.get("additionalProperties")
    return extra if isinstance(extra, dict) else {}


def numbers_by_schema(value: Any, node: dict, root: dict) -> Any:
    """Numeric strings where the schema wants a number, read as that number ('1e-2' -> 0.01)."""
    node = _resolve(node, root)
    if isinstance(value, str):
        kind = _schema_kind(node, root)
        number = number_from_text(value, kind) if kind else None
        return value if number is None else number
    if isinstance(value, dict):
        return {k: numbers_by_schema(v, _child(node, k), root) for k, v in value.items()}
    if isinstance(value, list):
        items = node.get("items", {})
        return [numbers_by_schema(v, items, root) for v in value]
    return value


def _number_for_field(section: str, name: str, value: Any) -> Any:
    """A numeric string in a numeric field of model/optim/train read as that number (element-wise in
    a tuple field such as optim.betas); anything else unchanged, for the checks to name."""
    kind = field_kind(section, name) if name in section_fields(section) else None
    if kind is None:
        return value
    if isinstance(value, list):
        return [_number_for_field(section, name, v) for v in value]
    if isinstance(value, str):
        number = number_from_text(value, kind)
        return value if number is None else number
    return value


def read_numbers(config: dict, schema_path: Path | str | None = DEFAULT_SCHEMA) -> dict:
    """A copy of `config` with numeric strings in numeric fields read as numbers: YAML 1.1 reads
    `lr: 1e-2` as the string '1e-2', which is meant as 0.01. Numeric fields are those the schema types
    as numbers (defaults.lr/beta/seed and their grid axes, quant, launcher, data) and, by type hint, the
    model/optim/train fields in defaults and in dotted grid axes. A non-numeric string stays, to be
    refused by name."""
    if not isinstance(config, dict):
        return config
    config = copy.deepcopy(config)
    if schema_path is not None:
        schema = load_schema(str(schema_path))
        config = numbers_by_schema(config, schema, schema)
    def mapping(d: Any, key: str) -> dict:  # the schema has not been checked yet
        return d[key] if isinstance(d, dict) and isinstance(d.get(key), dict) else {}

    defaults = mapping(config, "defaults")
    for section in SECTIONS:
        if values := mapping(defaults, section):
            defaults[section] = {k: _number_for_field(section, k, v) for k, v in values.items()}
    for study in mapping(config, "studies"):
        grid = mapping(config["studies"][study], "grid")
        for axis, values in grid.items():
            section, _, name = axis.partition(".")
            if section in SECTIONS and isinstance(values, list):
                grid[axis] = [_number_for_field(section, name, v) for v in values]
    return config


def non_finite(value: Any, path: tuple = ()) -> list[str]:
    """Dotted keys of every inf or nan anywhere (no setting means either)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{_json_path(path)}: must be a finite number, got {value!r}"]
    if isinstance(value, dict):
        return [m for k, v in value.items() for m in non_finite(v, (*path, k))]
    if isinstance(value, list):
        return [m for i, v in enumerate(value) for m in non_finite(v, (*path, i))]
    return []


# ---- validation before expansion ---------------------------------------------------------------------

def _check_paths(config: dict) -> list[str]:
    """results_dir and report: safe characters, no '..', a folder and an .html file respectively."""
    errors = []
    for key, default in (("results_dir", "results"), ("report", "reports/index.html")):
        value = config.get(key, default)
        if not isinstance(value, str) or not SAFE_PATH.fullmatch(value) or ".." in Path(value).parts:
            errors.append(f"{key}: {value!r} is not allowed; use letters, digits and _ . / - with no "
                          f"'..' component and none starting with '-'")
        elif key == "results_dir" and Path(value).is_file():
            errors.append(f"results_dir: {value!r} is an existing file; it must be a folder (or not exist)")
        elif key == "report" and not value.endswith(".html"):
            errors.append(f"report: {value!r} must end with .html")
        elif key == "report" and Path(value).is_dir():
            errors.append(f"report: {value!r} is an existing folder; it must be an .html file path")
    return errors


def _check_value(section: str, name: str, value: Any, key: str) -> Any:
    """check_field, plus what a config file may not ask although the dataclass allows it: beta 0
    switches every residual branch off (ofe.config accepts it for tests of the block)."""
    value = check_field(section, name, value, key)
    if (section, name) == ("model", "beta") and value == 0:
        raise ConfigError(f"{key}: must be > 0, got {value!r}")
    return value


def _check(errors: list[str], section: str, name: str, value: Any, key: str) -> Any:
    try:
        return _check_value(section, name, value, key)
    except ConfigError as e:
        errors.append(str(e))
        return value


def _check_values(config: dict) -> list[str]:
    """Every value of defaults.model/optim/train and every study axis value, checked at its own key
    (`defaults.optim.betas[1]`, `studies.lr.grid.lr[0]`); values are normalised in place (1 -> 1.0 in
    a float field, so 1 and 1.0 are one run)."""
    errors: list[str] = []
    defaults = config["defaults"]
    for axis, (section, name) in AXIS_FIELDS.items():
        if defaults.get(axis) is not None:
            defaults[axis] = _check(errors, section, name, defaults[axis], f"defaults.{axis}")
    for section in SECTIONS:
        values = defaults.get(section) or {}
        allowed = section_fields(section)
        for name, value in values.items():
            if name not in allowed:
                errors.append(f"defaults.{section}.{name}: unknown key; allowed keys are {sorted(allowed)}")
            else:
                values[name] = _check(errors, section, name, value, f"defaults.{section}.{name}")
    sweepable = [f"{s}.{f}" for s in SECTIONS for f in section_fields(s)]
    for study, spec in config["studies"].items():
        for axis, values in spec.get("grid", {}).items():
            if "." in axis and axis not in sweepable:
                errors.append(f"studies.{study}.grid.{axis}: unknown grid axis; sweepable keys are {sweepable}")
                continue
            target = tuple(axis.split(".", 1)) if "." in axis else AXIS_FIELDS.get(axis)
            for i, v in enumerate(values if target else ()):
                key = f"studies.{study}.grid.{axis}[{i}]"
                try:
                    values[i] = _check_value(*target, v, key)
                    if "." in axis:  # its value may join the run's folder name
                        folder_segment(format_value(values[i]), key)
                except ConfigError as e:
                    errors.append(str(e))
    for cls, section in ((DataConfig, "data"), (QuantConfig, "quant")):  # quant: torchao installed if asked
        try:
            build_section(cls, config.get(section) or {}, section + ".")
        except ConfigError as e:
            errors.append(str(e))
    # where data and model meet: the model's vocabulary must cover the tokenizer's
    tokenizer = (config.get("data") or {}).get("tokenizer", "bytes")
    vocab = TOKENIZER_VOCAB.get(tokenizer)
    sizes = [("defaults.model.vocab_size", (defaults.get("model") or {}).get("vocab_size"))]
    sizes += [(f"studies.{s}.grid.model.vocab_size[{i}]", v) for s, spec in config["studies"].items()
              for i, v in enumerate(spec.get("grid", {}).get("model.vocab_size", []))]
    for key, size in sizes:
        if vocab and isinstance(size, int) and size < vocab:
            errors.append(f"{key}: {size} is smaller than the tokenizer's vocabulary ({vocab} for "
                          f"data.tokenizer {tokenizer!r}); must be >= {vocab}")
    return errors


def count_runs(config: dict) -> dict[str, int]:
    """Grid points per study: the product of its axes' lengths, computed without expanding (a checkpoint
    study: its checkpoints)."""
    return {study: math.prod(len(v) for v in spec["grid"].values()) if "grid" in spec else studies.count(spec)
            for study, spec in config["studies"].items()}


def validate(config: dict, schema_path: Path | str | None = DEFAULT_SCHEMA) -> dict:
    """Everything checkable before expanding the grid: numbers read, no inf/nan, the schema, paths,
    every value at its key, the grid's size. Returns the normalised copy (`expand` takes it as is)."""
    if not isinstance(config, dict):
        raise ConfigError(f"config.yaml: expected a mapping of settings, got {type(config).__name__}")
    config = read_numbers(config, schema_path)
    errors = non_finite(config)
    if schema_path is not None:
        errors += schema_errors(load_schema(str(schema_path)), config)
    if not errors and "defaults" not in config:  # what training runs start from; checkpoints need none
        grids = [s for s, spec in config["studies"].items() if "grid" in spec]
        errors = [f"defaults: required, since studies {grids} train runs from it"] if grids else []
        config["defaults"] = {}
    if not errors:
        errors = _check_paths(config) + check_tracking(config)
    if not errors:
        counts = count_runs(config)
        total, limit = sum(counts.values()), config.get("max_runs", MAX_RUNS)
        if total > limit:
            top = ", ".join(f"{s}: {n:,}" for s, n in sorted(counts.items(), key=lambda x: -x[1])[:3])
            errors = [f"studies: the grid has {total:,} runs ({top}), more than max_runs = {limit:,}; "
                      f"narrow the studies, or raise the limit with a top-level `max_runs: {total}`"]
    if not errors:
        errors = _check_values(config)
    if errors:
        raise ConfigError("\n".join(f"config.yaml: {line}" for line in errors))
    return config
