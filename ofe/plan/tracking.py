"""config.yaml's `tracking:` section (docs/tracking.md): checked before any job starts, then resolved into
the settings a run's tracker reads (`ofe.track`).

Tracking is how a run is observed, never what it computes, so it is no part of `RunConfig` (whose hash is
a run's identity): the resolved settings travel beside the run, as the launcher's do (in `--launcher-json`,
see workflow/rules/common.smk), and `ofe launch` writes them into the run folder (`tracking-settings.json`),
where every path of a job (local, SLURM, arrays, packed members, a requeue) finds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ofe.config import ConfigError

BACKENDS = ("none", "wandb", "mlflow")
WANDB_MODES = ("offline", "online")
ONLY_FOR = {"mode": "wandb", "tracking_uri": "mlflow"}  # keys that mean something to one backend only


def check_tracking(config: dict) -> list[str]:
    """What the schema cannot say about `tracking`: a key given for the other backend (a `mode` under
    mlflow would be silently ignored, so it is refused). The schema has checked keys and values."""
    tracking = config.get("tracking") or {}
    if not isinstance(tracking, dict):
        return []  # the schema names it
    backend = tracking.get("backend", "none")
    return [f"tracking.{key}: only for backend {owner!r}, but backend is {backend!r}; remove it or set "
            f"tracking.backend: {owner}"
            for key, owner in ONLY_FOR.items() if key in tracking and backend != owner]


def default_project(results_dir: str | Path) -> str:
    """The W&B project / MLflow experiment of a results folder: `results` -> ofe, `results/osp` -> ofe-osp,
    `/scratch/me/abl` -> ofe-abl: one per study set (configs/*.yaml each have their results_dir)."""
    parts = Path(results_dir).parts
    if parts[:1] == ("results",):
        parts = parts[1:]
    elif Path(results_dir).is_absolute():
        parts = parts[-1:]
    return "-".join(["ofe", *parts])


def tracking_settings(config: dict) -> dict[str, Any]:
    """The resolved settings of a validated config: {"backend": "none"}, or the backend with every default
    filled in. The MLflow file store's URI is absolute: a job may start in another working directory."""
    tracking = dict(config.get("tracking") or {})
    if problems := check_tracking(config):
        raise ConfigError("\n".join(f"config.yaml: {p}" for p in problems))
    backend = tracking.get("backend", "none")
    if backend == "none":
        return {"backend": "none"}
    results = config.get("results_dir", "results")
    out = {"backend": backend, "project": tracking.get("project") or default_project(results)}
    if backend == "wandb":
        # its files under RESULTS/wandb/ (W&B's own WANDB_DIR wins where it is set), beside RESULTS/mlruns
        out.update(mode=tracking.get("mode", "offline"), dir=str(Path(results).resolve()))
    else:
        out["tracking_uri"] = tracking.get("tracking_uri") or (Path(results).resolve() / "mlruns").as_uri()
    return out


def check_settings(settings: dict[str, Any], results_dir: str | Path = "results") -> dict[str, Any]:
    """Settings given on a command line (`ofe export --to`), checked as config.yaml's are, resolved for
    the results folder `results_dir`."""
    if not isinstance(settings, dict):
        raise ConfigError(f"tracking: expected a mapping, got {type(settings).__name__}")
    allowed = {"backend", "project", *ONLY_FOR}
    if unknown := sorted(set(settings) - allowed):
        raise ConfigError(f"tracking: unknown key {', '.join(map(repr, unknown))}; allowed keys are {sorted(allowed)}")
    backend = settings.get("backend", "none")
    if backend not in BACKENDS:
        raise ConfigError(f"tracking.backend: {backend!r} is not one of {list(BACKENDS)}")
    if settings.get("mode", "offline") not in WANDB_MODES:
        raise ConfigError(f"tracking.mode: {settings['mode']!r} is not one of {list(WANDB_MODES)}")
    for key in ("project", "tracking_uri"):
        if key in settings and (not isinstance(settings[key], str) or not settings[key]):
            raise ConfigError(f"tracking.{key}: expected a non-empty string, got {settings[key]!r}")
    return tracking_settings({"tracking": settings, "results_dir": str(results_dir)})
