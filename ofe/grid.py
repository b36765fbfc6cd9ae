"""config.yaml -> validated grid of runs (the union of every study's sub-grid).

A study is a named sub-grid over the axes block x beta x optimizer x lr x scale x seed, plus any
dotted config key (e.g. `optim.eps`). A run shared by two studies is one run. Every run is resolved
to a full `RunConfig` here, so any bad value fails before a job starts.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ofe import presets
from ofe.config import ConfigError, DataConfig, RunConfig, build_section, section_fields

AXES = ("scale", "block", "beta", "optimizer", "lr", "seed")  # in run-path order
SECTIONS = ("model", "optim", "train")
DEFAULT_SCHEMA = Path("workflow/schemas/config.schema.yaml")


@dataclass
class Run:
    """One grid point: its id (a readable relative path), labels, full config and studies."""

    run_id: str
    grid: dict[str, Any]
    config: RunConfig
    studies: list[str] = field(default_factory=list)


def _fmt(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def _json_path(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def validate_schema(config: dict, schema_path: Path | str = DEFAULT_SCHEMA) -> None:
    """Check config.yaml against the JSON schema; the error names the key and the allowed values."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    lines = []
    for e in errors:
        msg = e.message
        if e.validator == "additionalProperties":
            allowed = sorted(e.schema.get("properties", {}))
            patterns = list(e.schema.get("patternProperties", {}))
            unknown = [k for k in e.instance
                       if k not in allowed and not any(re.search(p, k) for p in patterns)]
            msg = f"unknown key {', '.join(map(repr, unknown))}; allowed keys are {allowed}"
            if patterns:
                msg += " or a dotted config key such as 'optim.eps' (model.*, optim.*, train.*)"
        lines.append(f"config.yaml: {_json_path(e.absolute_path)}: {msg}")
    raise ConfigError("\n".join(lines))


def _merge(base: dict, over: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in over.items():
        out.setdefault(section, {}).update(values)
    return out


def resolve_run(config: dict, point: dict[str, Any]) -> Run:
    """The full RunConfig of one grid point: scale preset <- block preset <- defaults <- axis values."""
    defaults = config.get("defaults", {})
    if point["scale"] not in presets.SCALES:
        raise ConfigError(f"scale: {point['scale']!r} is not one of {list(presets.SCALES)}")
    if point["block"] not in presets.BLOCKS:
        raise ConfigError(f"block: {point['block']!r} is not one of {list(presets.BLOCKS)}")
    sections = _merge(presets.SCALES[point["scale"]](), presets.BLOCKS[point["block"]]())
    sections = _merge(sections, {s: defaults.get(s, {}) for s in SECTIONS})
    axis_values: dict[str, dict] = {
        "optim": {"name": point["optimizer"], "lr": point["lr"]},
        "train": {"seed": point["seed"]},
        "model": {} if point.get("beta") is None else {"beta": point["beta"]},
    }
    extras = {k: v for k, v in point.items() if "." in k}
    for key in extras:
        section, name = key.split(".", 1)
        if section not in SECTIONS or name not in section_fields(section):
            raise ConfigError(f"grid axis {key!r}: unknown; sweepable keys are "
                              f"{[f'{s}.{f}' for s in SECTIONS for f in section_fields(s)]}")
    data = build_section(DataConfig, config.get("data", {}), "data.")
    # the config without the extra axes, needed only to tell which of them change the run
    base = RunConfig.from_dict({**_merge(sections, axis_values), "data": data.__dict__}) if extras else None
    for key, value in extras.items():
        section, name = key.split(".", 1)
        axis_values[section][name] = value
    cfg = RunConfig.from_dict({**_merge(sections, axis_values), "data": data.__dict__})
    grid = {**{a: point[a] for a in AXES if a != "beta"}, "beta": cfg.model.beta, **extras}
    # An extra axis joins the path only where it changes the run, so the eps study's 1e-8 run is the
    # same run (and folder) as the default Pre-LN run of the other studies.
    changed = {k: v for k, v in extras.items() if config_value(cfg, k) != config_value(base, k)}
    leaf = f"seed{grid['seed']}" + "".join(f"_{k}{_fmt(v)}" for k, v in sorted(changed.items()))
    run_id = "/".join([grid["scale"], grid["block"], f"beta{_fmt(grid['beta'])}", grid["optimizer"],
                       f"lr{_fmt(grid['lr'])}", leaf])  # a leaf folder: no run is inside another
    return Run(run_id, grid, replace(cfg, grid=grid))


def config_value(cfg: RunConfig, key: str) -> Any:
    """The value of a dotted key such as 'optim.eps' in a resolved config."""
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def expand(config: dict, schema_path: Path | str | None = DEFAULT_SCHEMA) -> dict[str, Run]:
    """Validate `config` and return every run of every study, keyed by run id, in study order."""
    if schema_path is not None:
        validate_schema(config, schema_path)
    defaults = config.get("defaults", {})
    runs: dict[str, Run] = {}
    for study, spec in config["studies"].items():
        grid = spec.get("grid", {})
        axes = list(dict.fromkeys([*AXES, *grid]))
        values = [grid.get(a, [defaults.get(a)]) for a in axes]
        for combo in itertools.product(*values):
            point = dict(zip(axes, combo))
            try:
                run = resolve_run(config, point)
            except ConfigError as e:
                raise ConfigError(f"config.yaml: studies.{study}: {e}") from None
            run = runs.setdefault(run.run_id, run)
            if study not in run.studies:
                run.studies.append(study)
    # every run gets a value in every extra grid column: the one its config has
    extra_keys = sorted({k for r in runs.values() for k in r.grid if k not in AXES})
    for r in runs.values():
        for k in extra_keys:
            r.grid.setdefault(k, config_value(r.config, k))
    return runs


def studies_metadata(config: dict) -> list[dict]:
    """Per study, in config order: name, title, question and the axes it sweeps (more than one
    value), for the report. A list, since JSON metadata is written with sorted keys."""
    out = []
    for name, spec in config["studies"].items():
        grid = spec.get("grid", {})
        out.append({
            "name": name,
            "title": spec.get("title", name),
            "question": spec.get("question", ""),
            "axes": [a for a, v in grid.items() if len(v) > 1] or list(grid)[:1],
        })
    return out


def load_config(path: Path | str) -> dict:
    return yaml.safe_load(Path(path).read_text())
