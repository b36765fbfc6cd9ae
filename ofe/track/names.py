"""ofe's rows spelt as tracker names, pure functions (no tracker library, no I/O).

A metric row (step, tokens, layer, site, metric, value), as metrics.parquet holds it, becomes
`<site>/<metric>` for the run-level rows (layer -1: `train/loss`, `train/lr`, `train/grad_norm`,
`val/loss`) and `<metric>/<site>/layer_<layer>` for the per-layer ones (`kurtosis/block_input/layer_3`),
so a dashboard plots one metric of one site across layers with one prefix. The names are the Parquet's
own site and metric names, so a figure in a dashboard and one in the report read the same column.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

Row = tuple  # (step, tokens, layer, site, metric, value), as `ofe.train.state.Row`
TOKENS = "tokens"  # the tokens seen at each logged step, so a dashboard can plot against tokens
# summary.json's text fields worth a tag (the rest are in the config, or provenance)
SUMMARY_TAGS = ("status", "config_hash", "device_type", "precision")


def metric_name(layer: int, site: str, metric: str) -> str:
    """The tracker name of one metric row (see the module docstring)."""
    return f"{site}/{metric}" if layer < 0 else f"{metric}/{site}/layer_{layer}"


def step_groups(rows: Iterable[Row]) -> list[tuple[int, dict[str, float]]]:
    """Rows -> [(step, {name: value})] in step order, one entry per step (a tracker logs a step at once),
    with the step's `tokens`. Within a step the run-level rows come last: MLflow's file store writes a
    batch metric by metric, and a resumed run reads the last step logged from `train/loss`, so a batch
    cut short by a kill is logged again rather than left half done."""
    groups: dict[int, dict[str, float]] = {}
    run_level: dict[int, dict[str, float]] = {}
    for step, tokens, layer, site, metric, value in rows:
        step = int(step)
        groups.setdefault(step, {TOKENS: float(tokens)})
        (run_level.setdefault(step, {}) if layer < 0 else groups[step])[metric_name(layer, site, metric)] = float(value)
    return [(s, {**groups[s], **run_level.get(s, {})}) for s in sorted(groups)]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A run config as dotted parameters (`model.norm`, `optim.betas`), values as they are (lists stay
    lists: W&B shows them, MLflow's backend writes them as text)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def grid_tags(grid: dict[str, Any]) -> dict[str, str]:
    """The run's grid values as tags, spelt as in its folder name (`lr` 0.01 -> '0.01', beta 1.0 -> '1')."""
    from ofe.plan.validate import format_value  # the one spelling of grid values

    return {key: format_value(value) for key, value in grid.items()}


def run_name(out: Path | str) -> str:
    """A run's name in a tracker: its run id, the folder's path below `runs/` (the whole path where
    there is no such part): the name the report and `ofe status` use."""
    parts = Path(out).resolve().parts
    below = [i for i, p in enumerate(parts) if p == "runs"]
    return "/".join(parts[below[-1] + 1:]) if below and below[-1] + 1 < len(parts) else Path(out).name


def seed_group(name: str) -> str:
    """The run's name without its seed (`.../lr0.01/seed1_optim.eps0.001` -> `.../lr0.01/optim.eps0.001`):
    the W&B group, so a dashboard draws the seeds of one config as one line with a band, as the report does."""
    *head, leaf = name.split("/")
    leaf = re.sub(r"^seed[^_]*_?", "", leaf)
    return "/".join([*head, leaf] if leaf else head)


def summary_values(summary: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """summary.json as (numbers under `summary/<key>`, text tags): its top-level figures (final losses,
    the last probe's largest kurtosis, speed, memory); None (a diverged run's final loss) is left out."""
    numbers = {f"summary/{k}": float(v) for k, v in summary.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tags = {k: str(summary[k]) for k in SUMMARY_TAGS if summary.get(k) is not None}
    return numbers, tags


def quant_values(rows: Iterable[tuple]) -> dict[str, float]:
    """quant.parquet rows (protocol, bits, ppl_fp, ppl_q, delta) as `int8/<protocol>/bits<b>/<column>`."""
    return {f"int8/{protocol}/bits{int(bits)}/{column}": float(value)
            for protocol, bits, *values in rows
            for column, value in zip(("ppl_fp", "ppl_q", "delta"), values)}
