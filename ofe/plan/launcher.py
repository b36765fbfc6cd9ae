"""The launcher settings (how jobs run): config.yaml's `launcher`, updated from a profile's launcher_file,
checked against the schema, then against the plan's runs (each run's batch over its processes, packing)
before any job starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ofe.config import ConfigError
from ofe.plan.validate import DEFAULT_SCHEMA, load_schema, non_finite, numbers_by_schema, schema_errors
from ofe.plan.yamlio import load_config


def launcher_settings(config: dict, schema_path: Path | str = DEFAULT_SCHEMA) -> dict:
    """config.yaml's `launcher`, updated from the file a profile names in `launcher_file`, numbers read
    and checked against the schema's `$defs/launcher` (unknown keys refused, launcher.slurm's included)."""
    launcher = dict(config.get("launcher") or {"cluster": "local"})
    from_file: dict = {}
    source = config.get("launcher_file")
    if source:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"launcher_file: {str(source)!r} does not exist or is not a file (relative to "
                              f"{Path.cwd()}); give the path of a YAML file of launcher settings")
        from_file = load_config(path) or {}
        if not isinstance(from_file, dict):
            raise ConfigError(f"launcher_file {source}: expected a mapping of launcher settings, got "
                              f"{type(from_file).__name__}")
        launcher.update(from_file)
    schema = load_schema(str(schema_path))
    launcher = numbers_by_schema(launcher, schema["$defs"]["launcher"], schema)
    lines = non_finite(launcher, ("launcher",))
    lines = lines or schema_errors({"$defs": schema["$defs"], "$ref": "#/$defs/launcher"}, launcher,
                                    ("launcher",))
    if lines:
        where = f"{source} (launcher_file)" if from_file else "config.yaml"
        raise ConfigError("\n".join(f"{where}: {line}" for line in lines))
    return launcher


def check_launcher(plan_runs: Iterable[Any], launcher: dict) -> None:
    """Each run's global batch (train.batch_size) must split evenly over its processes: tasks_per_node
    x nodes for its scale (launcher.scales[scale], else launcher's own; the local executor runs one
    node), as data-parallel training does. Runs come from the plan (dicts) or from `grid.expand` (Run)."""
    bad: dict[tuple, list[str]] = {}
    for r in plan_runs:
        run_id, scale, batch = ((r["run_id"], r["grid"]["scale"], r["config"]["train"]["batch_size"])
                                if isinstance(r, dict) else (r.run_id, r.grid["scale"], r.config.train.batch_size))
        own = (launcher.get("scales") or {}).get(scale) or {}
        keys = {k: (f"launcher.scales.{scale}.{k}", own[k]) if k in own else (f"launcher.{k}", launcher.get(k, 1))
                for k in ("tasks_per_node", "nodes")}
        if launcher.get("cluster") != "slurm":
            keys["nodes"] = ("nodes (one for the local executor)", 1)
        processes = keys["tasks_per_node"][1] * keys["nodes"][1]
        if batch % processes:
            bad.setdefault((scale, batch, processes, *keys.values()), []).append(run_id)
    lines = [f"scale {scale!r}: train.batch_size {batch} is not divisible by its {n} processes "
             f"({tk} {tv} x {nk} {nv}), in {len(ids)} runs such as {ids[0]}; make the batch a multiple "
             f"of {n} or change {tk}"
             for (scale, batch, n, (tk, tv), (nk, nv)), ids in bad.items()]
    if lines:
        raise ConfigError("launcher: each process trains an equal share of the batch:\n" + "\n".join(lines))


def check_packing(launcher: dict) -> None:
    """`scales.<scale>.pack` and `array` are SLURM features, and a packed run is one CPU process: packing
    runs of several processes or GPUs is refused (their members would compete for the same devices)."""
    lines = []
    slurm = launcher.get("cluster", "local") == "slurm"
    if launcher.get("array") and not slurm:
        lines.append("launcher.array: true needs cluster: slurm (the local executor runs each job as a process)")
    for scale, own in (launcher.get("scales") or {}).items():
        pack = int((own or {}).get("pack", 1))
        if pack == 1:
            continue
        key = f"launcher.scales.{scale}.pack"
        if not slurm:
            lines.append(f"{key}: {pack} needs cluster: slurm; remove it for the local executor")
        for name in ("tasks_per_node", "nodes", "gpus_per_node"):
            value = int(own.get(name, launcher.get(name, 0 if name == "gpus_per_node" else 1)))
            if value != (0 if name == "gpus_per_node" else 1):
                lines.append(f"{key}: {pack} packs one-process CPU runs, but {scale} has {name} {value}; "
                             f"remove pack for this scale or set {name} to {0 if name == 'gpus_per_node' else 1}")
    if lines:
        raise ConfigError("\n".join(lines))
