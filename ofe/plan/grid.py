"""config.yaml -> validated grid of runs (the union of every study's sub-grid).

A study is a named sub-grid over the axes block x beta x optimizer x lr x scale x seed, plus any
dotted config key (e.g. `optim.eps`). A run shared by two studies is one run. Every run is resolved
to a full `RunConfig` here, so any bad value fails before a job starts, naming its key.

Run ids are folder paths built from the grid values, exactly (a float by its shortest round-trip
repr), from a safe character set; two different configs never share one (`expand` refuses).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from ofe.config import ConfigError, DataConfig, RunConfig, build_section, section_fields
from ofe.config import SECTIONS as SECTIONS_BY_NAME
from ofe.plan import offline, presets, studies
from ofe.plan.validate import AXES, DEFAULT_SCHEMA, SECTIONS, folder_segment, format_value, validate
from ofe.plan.vocab import tokenizer_vocab
# re-exported: the workflow reaches the config checks through ofe.plan.grid
from ofe.plan.launcher import check_launcher, check_packing, launcher_settings  # noqa: F401
from ofe.plan.yamlio import load_config  # noqa: F401


@dataclass
class Run:
    """One grid point: its id (a readable relative path), labels, full config and studies."""

    run_id: str
    grid: dict[str, Any]
    config: RunConfig
    studies: list[str] = field(default_factory=list)

# ---- expansion ---------------------------------------------------------------------------------------

def _merge(base: dict, over: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in over.items():
        out.setdefault(section, {}).update(values)
    return out


def _frozen(value: Any) -> Any:
    """A hashable stand-in for a section value (lists become tuples, which the section accepts as is)."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


@functools.lru_cache(maxsize=4096)
def _section(name: str, items: tuple) -> Any:
    return build_section(SECTIONS_BY_NAME[name], dict(items), f"{name}.")


def _run_config(sections: dict[str, dict], data: DataConfig) -> RunConfig:
    """RunConfig of the merged sections. Each distinct section is built (and validated) once: the runs
    of a grid share most of them, and checking every field of every run dominates a 10,000-run plan."""
    parts = {name: _section(name, tuple((k, _frozen(v)) for k, v in values.items()))
             for name, values in sections.items()}
    return RunConfig(**parts, data=data)


def resolve_run(config: dict, point: dict[str, Any], data: DataConfig | None = None) -> Run:
    """The full RunConfig of one grid point: scale preset <- block preset <- defaults <- axis values."""
    defaults = config.get("defaults", {})
    if point["scale"] not in presets.SCALES:
        raise ConfigError(f"scale: {point['scale']!r} is not one of {list(presets.SCALES)}")
    if point["block"] not in presets.BLOCKS:
        raise ConfigError(f"block: {point['block']!r} is not one of {list(presets.BLOCKS)}")
    # the block preset at the model's depth (OP's beta shrinks past 12 layers): a swept or default
    # model.n_layer wins over the scale's own
    depth = point.get("model.n_layer", (defaults.get("model") or {}).get("n_layer"))
    sections = presets.resolve(point["scale"], point["block"], depth, point["optimizer"])
    sections = _merge(sections, {s: defaults.get(s) or {} for s in SECTIONS})
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
    if data is None:
        data = build_section(DataConfig, config.get("data") or {}, "data.")
    # the config without the extra axes, needed only to tell which of them change the run
    base = _run_config(_merge(sections, axis_values), data) if extras else None
    for key, value in extras.items():
        section, name = key.split(".", 1)
        axis_values[section][name] = value
    cfg = _run_config(_merge(sections, axis_values), data)
    vocab = tokenizer_vocab(data.tokenizer)  # None: a hub tokenizer not cached here; training checks it
    if vocab and cfg.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({vocab} for data.tokenizer {data.tokenizer!r}); must be >= {vocab}")
    grid = {**{a: point[a] for a in AXES if a != "beta"}, "beta": cfg.model.beta, **extras}
    # An extra axis joins the path only where it changes the run, so the eps study's 1e-8 run is the
    # same run (and folder) as the default Pre-LN run of the other studies.
    changed = {k: v for k, v in extras.items() if config_value(cfg, k) != config_value(base, k)}
    fmt = format_value
    leaf = f"seed{fmt(grid['seed'])}" + "".join(f"_{k}{folder_segment(fmt(v), f'grid.{k}')}"
                                                for k, v in sorted(changed.items()))
    segments = [(grid["scale"], "scale"), (grid["block"], "block"), (f"beta{fmt(grid['beta'])}", "beta"),
                (grid["optimizer"], "optimizer"), (f"lr{fmt(grid['lr'])}", "lr"), (leaf, "seed")]
    run_id = "/".join(folder_segment(s, f"grid.{what}") for s, what in segments)  # a leaf: no run inside another
    return Run(run_id, grid, replace(cfg, grid=grid))


def config_value(cfg: RunConfig, key: str) -> Any:
    """The value of a dotted key such as 'optim.eps' in a resolved config."""
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def expand(config: dict, schema_path: Path | str | None = DEFAULT_SCHEMA) -> dict[str, Run]:
    """Validate `config` and return every run of every study, keyed by run id, in study order."""
    return expand_valid(validate(config, schema_path))


def expand_valid(config: dict) -> dict[str, Run]:
    """`expand` of a config `validate` has returned. Two grid points with one run id are one run if
    their configs are equal (a run shared by studies); if they differ, ConfigError names both."""
    defaults = config.get("defaults", {})
    data = build_section(DataConfig, config.get("data") or {}, "data.")
    try:  # once, before the runs, so a tokenizer that does not load is named as data's, not a study's
        tokenizer_vocab(data.tokenizer)
    except ConfigError as e:
        raise ConfigError(f"config.yaml: {e}") from None
    # offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE): a hub dataset must already be in the local cache
    if problem := offline.check_dataset(data.source, data.path, data.name, data.split):
        raise ConfigError(f"config.yaml: {problem}")
    runs: dict[str, Run] = {}
    origin: dict[str, tuple[str, dict, str]] = {}  # run id -> (study, point, config hash)
    for study, spec in config["studies"].items():
        if studies.is_checkpoint_study(spec):  # no training: `ofe.plan.studies.expand` plans its jobs
            continue
        grid = spec.get("grid", {})
        axes = list(dict.fromkeys([*AXES, *grid]))
        values = [grid.get(a, [defaults.get(a)]) for a in axes]
        for combo in itertools.product(*values):
            point = dict(zip(axes, combo))
            try:
                run = resolve_run(config, point, data)
            except ConfigError as e:
                raise ConfigError(f"config.yaml: studies.{study}: {e}") from None
            first = runs.get(run.run_id)
            if first is None:
                runs[run.run_id] = first = run
                origin[run.run_id] = (study, point, "")
            else:
                first_study, first_point, first_hash = origin[run.run_id]
                first_hash = first_hash or first.config.config_hash()
                origin[run.run_id] = (first_study, first_point, first_hash)
                if run.config.config_hash() != first_hash:
                    raise ConfigError(
                        f"config.yaml: studies.{first_study} and studies.{study}: two different configs "
                        f"would share the run folder {run.run_id!r}: {first_point} in {first_study} and "
                        f"{point} in {study}; make the grids differ in an axis of the folder name")
            if study not in first.studies:
                first.studies.append(study)
    # every run gets a value in every extra grid column: the one its config has
    extra_keys = sorted({k for r in runs.values() for k in r.grid if k not in AXES})
    for r in runs.values():
        for k in extra_keys:
            r.grid.setdefault(k, config_value(r.config, k))
    return runs

def studies_metadata(config: dict) -> list[dict]:
    """Per study, in config order: name, title, question, kind ("runs", or "checkpoints" for a list of
    pretrained checkpoints, with its models) and the axes it sweeps (more than one value), for the
    report. A list, since JSON metadata is written with sorted keys."""
    out = []
    for name, spec in config["studies"].items():
        grid = spec.get("grid", {})
        study = {
            "name": name,
            "title": spec.get("title", name),
            "question": spec.get("question", ""),
            "kind": "checkpoints" if studies.is_checkpoint_study(spec) else "runs",
            "axes": [a for a, v in grid.items() if len(v) > 1] or list(grid)[:1],
        }
        if study["kind"] == "checkpoints":
            study["models"] = [{"name": m["name"], "label": studies.label(m["name"]),
                                "revisions": m.get("revisions") or [None]} for m in spec["models"]]
        out.append(study)
    return out


def default_figures_dir(out_html: Path | str) -> Path:
    """Where a page's figures go: `figures/` beside `index.html`, `<stem>-figures/` beside any other page,
    so that two reports in one folder (reports/index.html, reports/paper-int8.html) never share, and
    never delete, each other's figures."""
    out_html = Path(out_html)
    return out_html.parent / ("figures" if out_html.stem == "index" else f"{out_html.stem}-figures")


def runs_digest(run_ids: Iterable[str]) -> str:
    """A short fingerprint of a set of run ids: the report step compares the plan's with the aggregated
    table's, so a table that lost track of the grid (e.g. a results folder moved, and with it Snakemake's
    record of the aggregation's inputs) is refused instead of reported as the grid."""
    return hashlib.sha256("\n".join(sorted(run_ids)).encode()).hexdigest()[:16]
