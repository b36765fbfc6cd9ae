"""The report's tables as data for the `table` macro (tables.html.j2): the runs table (one row per
planned run), a study's table by configuration (mean ± std over seeds) and the "mean ± std" cells it
shares with the int8 section's."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ofe.report.htmlparts import as_list, cell, fmt_number, fmt_value, relative_href, to_slug

# (runs-table column, header, format) of a study's table by configuration.
STUDY_MEASURES = (
    ("final_val_loss", "final val loss", ".3f"),
    ("peak_kurtosis", "peak kurtosis", ".3g"),
    ("final_mean_kurtosis", "final mean kurtosis", ".3g"),
)


def runs_table(runs: pd.DataFrame, grid: list[str], runs_dir: Path, page_dir: Path) -> dict:
    """Every planned run: its configuration, studies, status, final loss, kurtosis, throughput, a link to
    its folder relative to the page (when the folder exists) and the last line of its error."""
    header = [
        "run_id", *grid, "studies", "status", "final val loss", "final mean kurtosis", "peak kurtosis", "tokens/s",
        "files", "error",
    ]
    rows = []
    for run in runs.to_dict("records"):
        status = str(run.get("status"))
        folder = runs_dir / str(run["run_id"])
        files = (cell("run folder", "files", href=f"{relative_href(folder, page_dir)}/") if folder.is_dir()
                 else cell("-", "files"))
        cells = [cell(run["run_id"]), *[cell(fmt_value(run.get(c))) for c in grid]]
        cells += [
            cell(", ".join(as_list(run.get("studies")))),
            cell(status, f"status-{to_slug(status)}"),
            cell(fmt_number(run.get("final_val_loss"), ".4f"), "num"),
            cell(fmt_number(run.get("final_mean_kurtosis"), ".4g"), "num"),
            cell(fmt_number(run.get("peak_kurtosis"), ".4g"), "num"),
            cell(fmt_number(run.get("tokens_per_s"), ",.0f"), "num"),
            files,
            cell(last_line(run.get("error")), "error"),
        ]
        rows.append({"title": None, "cells": cells})
    return {"cls": "runs", "header": header, "rows": rows}


def configuration_table(members: pd.DataFrame, configurations: pd.Series) -> dict:
    """A study's runs by configuration (`configurations`: each run's, seeds excepted), in plan order: the
    number n of runs, then of the final validation loss, peak and final mean kurtosis the mean ± std over
    the runs with a finite value, their count where some have none (failed, diverged)."""
    rows = []
    for configuration, group in members.groupby(configurations, sort=False):
        cells = [cell(configuration), cell(len(group), "num")]
        for column, _, fmt in STUDY_MEASURES:
            values = pd.to_numeric(group[column], errors="coerce")
            values = values[np.isfinite(values.to_numpy(dtype=float))]
            note = f" ({len(values)} of {len(group)})" if 0 < len(values) < len(group) else ""
            cells.append(spread_cell(values.mean(), values.std(), values.min(), values.max(), fmt, note=note))
        rows.append({"title": None, "cells": cells})
    header = ["configuration", "n", *[name for _, name, _ in STUDY_MEASURES]]
    return {"cls": "by-config", "header": header, "rows": rows}


def spread_cell(
    mean: float, std: float, lo: float, hi: float, fmt: str, percent: bool = False, note: str = ""
) -> dict:
    """A "mean ± std" cell over a configuration's seeds (the mean alone where std is NaN: one seed), the
    range over seeds in its tooltip; `percent` shows relative changes as signed percentages; `note`
    follows the numbers."""
    factor, sign, unit = (100.0, "+", "%") if percent else (1.0, "", "")
    mean, std, lo, hi = (float(v) * factor for v in (mean, std, lo, hi))
    if not math.isfinite(mean):
        return cell("-", "num")
    text = f"{mean:{sign}{fmt}}{unit}"
    if math.isfinite(std):
        text += f" ± {std:{fmt}}{unit}"
    return cell(text + note, "num", title=f"range over seeds: {lo:{sign}{fmt}}{unit} to {hi:{sign}{fmt}}{unit}")


def last_line(error: object) -> str:
    """The last line of an error (a traceback ends with the exception), "" when there is none."""
    if not isinstance(error, str) or not error.strip():
        return ""
    return error.strip().splitlines()[-1]
