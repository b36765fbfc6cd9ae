"""The report's tables as data for the `table` macro (tables.html.j2): the runs table (one row per
planned run) and the "mean ± std" cells of the tables by configuration."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ofe.htmlparts import as_list, cell, fmt_number, fmt_value, relative_href, to_slug


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
            cell(_last_line(run.get("error")), "error"),
        ]
        rows.append({"title": None, "cells": cells})
    return {"cls": "runs", "header": header, "rows": rows}


def spread_cell(mean: float, std: float, lo: float, hi: float, fmt: str, percent: bool = False) -> dict:
    """A "mean ± std" cell over a configuration's seeds (the mean alone where std is NaN: one seed), the
    range over seeds in its tooltip; `percent` shows relative changes as signed percentages."""
    factor, sign, unit = (100.0, "+", "%") if percent else (1.0, "", "")
    mean, std, lo, hi = (float(v) * factor for v in (mean, std, lo, hi))
    if not math.isfinite(mean):
        return cell("-", "num")
    text = f"{mean:{sign}{fmt}}{unit}"
    if math.isfinite(std):
        text += f" ± {std:{fmt}}{unit}"
    return cell(text, "num", title=f"range over seeds: {lo:{sign}{fmt}}{unit} to {hi:{sign}{fmt}}{unit}")


def _last_line(error: object) -> str:
    if not isinstance(error, str) or not error.strip():
        return ""
    return error.strip().splitlines()[-1]
