"""The report's int8 section: which tensors each protocol quantises, the paper's table per run (block,
optimiser, kurtosis, ppl fp, ppl after quantisation), the same table by configuration with the mean and
spread over seeds, and the figures: degradation against kurtosis (every protocol and bit width, with
Spearman's correlation and its n) and against validation loss (configurations compared at equal loss)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ofe.io import QUANTISED_TENSORS
from ofe.report.htmlparts import Figure, Links, cell, figure_context, fmt_number, fmt_value, render, to_slug
from ofe.report.plots import int8 as plots_int8
from ofe.report.plots.common import REPLICATE_AXES
from ofe.report.tables import spread_cell

# Quantisation protocols in page order (others follow alphabetically) and their short column names.
# torchao_dynamic (real int8 kernels) comes right after the simulated dynamic protocol it checks.
QUANT_PROTOCOLS = ("static_per_tensor", "dynamic_per_token", "torchao_dynamic")
PROTOCOL_SHORT = {"static_per_tensor": "static", "dynamic_per_token": "dynamic", "torchao_dynamic": "torchao"}
# Grid columns the int8 table always shows (the paper's table); any other one is shown when it varies.
QUANT_TABLE_COLUMNS = ("block", "optimizer")
QUANT_CAPTION = (
    "Relative perplexity degradation after {protocol} quantisation (ppl_q / ppl_fp - 1) against mean Kurt "
    "(averaged over layers at the last logged step), one point per run and bit width, with Spearman's rank "
    "correlation and its number of runs n per bit width."
)
LOSS_CAPTION = (
    "Relative perplexity degradation after {name} quantisation against the run's final validation loss, "
    "one point per run, colour = configuration: read configurations off at equal loss, so that a worse "
    "model is not mistaken for a less quantisable one."
)
VISIBLE = 0.01  # a relative perplexity loss from this size up is called visible in the section's summary


def load_quant(results_dir: Path, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """`results_dir/quant.parquet` with each run's final validation loss (`final_val_loss`, from
    `runs`), or an empty frame where it is absent (results from before it existed)."""
    path = Path(results_dir) / "quant.parquet"
    if not path.exists():
        return pd.DataFrame()
    quant = pd.read_parquet(path)
    if runs is not None and "final_val_loss" in runs.columns and not quant.empty:
        quant = quant.merge(runs[["run_id", "final_val_loss"]], on="run_id", how="left")
    return quant


def quant_protocol_bits(quant: pd.DataFrame) -> list[tuple[str, int]]:
    """The (protocol, bits) pairs present, in page order: known protocols first, then widest bits first."""
    pairs = {(str(p), int(b)) for p, b in zip(quant["protocol"], quant["bits"])}
    rank = {p: i for i, p in enumerate(QUANT_PROTOCOLS)}
    return sorted(pairs, key=lambda pb: (rank.get(pb[0], len(rank)), pb[0], -pb[1]))


def quant_column_name(protocol: str, bits: int) -> str:
    """The int8 table's header of one protocol and bit width, e.g. "static W8A8"."""
    return f"{PROTOCOL_SHORT.get(protocol, protocol)} W{bits}A{bits}"


def quant_table(quant: pd.DataFrame, id_columns: list[str]) -> pd.DataFrame:
    """One row per run: run_id, `id_columns`, status, mean_kurtosis, ppl_fp, final_val_loss, then ppl_q
    under each `quant_column_name`; sorted by mean kurtosis (missing last), then run_id."""
    keep = [*id_columns, "status", "mean_kurtosis", "ppl_fp", "final_val_loss"]
    per_run = quant.groupby("run_id", sort=False).agg({c: "first" for c in keep if c in quant.columns})
    for column in ("status", "mean_kurtosis", "ppl_fp", "final_val_loss"):
        if column not in per_run.columns:
            per_run[column] = math.nan
    ppl_q = quant.groupby(["run_id", "protocol", "bits"])["ppl_q"].first()
    for protocol, bits in quant_protocol_bits(quant):
        per_run[quant_column_name(protocol, bits)] = ppl_q.xs((protocol, bits), level=("protocol", "bits"))
    table = per_run.reset_index().sort_values(["mean_kurtosis", "run_id"], na_position="last", kind="stable")
    return table.reset_index(drop=True)


def config_table(quant: pd.DataFrame, id_columns: list[str]) -> pd.DataFrame:
    """`quant_table` grouped by `id_columns` (the configuration, seeds excluded): `n` runs with a
    finite ppl fp, and for each measure its `<name> mean`, `<name> std` (sample; NaN for one run),
    `<name> min` and `<name> max`; measures are final_val_loss, mean_kurtosis, ppl_fp and, per
    `quant_column_name`, the relative change ppl_q / ppl_fp - 1. Sorted by mean kurtosis."""
    table = quant_table(quant, id_columns)
    table = table[pd.to_numeric(table["ppl_fp"], errors="coerce").notna()]
    q_columns = [quant_column_name(p, b) for p, b in quant_protocol_bits(quant)]
    measures = table[["final_val_loss", "mean_kurtosis", "ppl_fp"]].astype(float)
    for column in q_columns:
        measures[column] = table[column].astype(float) / table["ppl_fp"].astype(float) - 1.0
    keys = table[id_columns].map(fmt_value) if id_columns else pd.DataFrame(index=table.index)
    grouped = measures.groupby([keys[c] for c in id_columns], sort=False) if id_columns else measures.groupby(
        lambda _: "all")
    out = grouped.agg(["mean", "std", "min", "max"])
    out.columns = [f"{name} {stat}" for name, stat in out.columns]
    out.insert(0, "n", grouped.size())
    out = out.reset_index()
    return out.sort_values("mean_kurtosis mean", kind="stable").reset_index(drop=True)


def damage_summary(quant: pd.DataFrame) -> list[str]:
    """One plain sentence per protocol and bit width: how many runs lose at least VISIBLE of their
    perplexity, and the largest loss with its run and mean kurtosis, so the page says where the damage
    sits (or that there is none) without reading the table."""
    lines = []
    for protocol, bits in quant_protocol_bits(quant):
        rows = quant[(quant["protocol"] == protocol) & (quant["bits"] == bits)]
        change = pd.to_numeric(rows["ppl_q"], errors="coerce") / pd.to_numeric(rows["ppl_fp"], errors="coerce") - 1
        change = change[change.notna() & (change.abs() != float("inf"))]
        name = quant_column_name(protocol, bits)
        if change.empty:
            lines.append(f"{name}: no run with finite perplexities.")
            continue
        worst = rows.loc[change.idxmax()]
        visible = int((change >= VISIBLE).sum())
        kurt = fmt_number(worst.get("mean_kurtosis"), ".3g") or "-"
        lines.append(
            f"{name}: {visible} of {len(change)} runs lose {VISIBLE:.0%} or more; the largest change is "
            f"{100 * change.max():+.2f}% ({worst['run_id']}, mean Kurt {kurt})."
        )
    return lines


def kernel_check(quant: pd.DataFrame, bits: int = 8) -> str | None:
    """One sentence comparing torchao's real int8 kernels with the simulated dynamic protocol they
    reproduce, over the runs that have both at `bits` (None when none has): the largest difference of
    their perplexities relative to ppl fp, beside that run's simulated damage, so a reader sees whether the
    simulation's figures are the kernels' figures."""
    rows = quant[quant["bits"] == bits]
    ppl_q = rows.pivot_table(index="run_id", columns="protocol", values="ppl_q", aggfunc="first")
    if not {"dynamic_per_token", "torchao_dynamic"} <= set(ppl_q.columns):
        return None
    ppl_fp = rows.groupby("run_id")["ppl_fp"].first()
    sim, real = ppl_q["dynamic_per_token"], ppl_q["torchao_dynamic"]
    gap = ((real - sim).abs() / ppl_fp).replace([float("inf")], float("nan")).dropna()
    if gap.empty:
        return None
    worst = gap.idxmax()
    return (f"Real int8 kernels: {quant_column_name('torchao_dynamic', bits)} and the simulated "
            f"{quant_column_name('dynamic_per_token', bits)} differ by at most {100 * gap.max():.2f}% of ppl fp "
            f"over {len(gap)} runs ({worst}, whose simulated change is "
            f"{fmt_change(sim[worst] / ppl_fp[worst] - 1)}); the simulation's weight ranges are quant.weight_range, "
            f"torchao's always absmax.")


def int8_context(index: int, quant: pd.DataFrame, grid: list[str], links: Links) -> tuple[dict, list[Figure]]:
    """What int8.html.j2 writes for the int8 section over every run (`index` its number): protocols and
    their tensors, where the damage sits, the table by configuration when some configuration has several
    seeds, the table per run, then the figures; and those figures."""
    runs = quant.drop_duplicates("run_id")
    shown = [
        c for c in grid
        if c in quant.columns and (c in QUANT_TABLE_COLUMNS or runs[c].nunique(dropna=False) > 1)
    ]
    protocols = list(dict.fromkeys(p for p, _ in quant_protocol_bits(quant)))
    by_config = [c for c in shown if c not in REPLICATE_AXES]  # seeds: averaged over
    several_seeds = len(by_config) < len(shown) or runs.groupby(by_config).size().max() > 1
    figures = []
    for protocol in protocols:
        caption = QUANT_CAPTION.format(protocol=plots_int8.PROTOCOL_NAMES.get(protocol, protocol))
        figures.append(Figure(f"int8-degradation-{to_slug(protocol)}",
                              plots_int8.quant_degradation_scatter(quant, protocol), caption))
    if "final_val_loss" in quant.columns and protocols:
        protocol = protocols[0]
        bits = max(b for p, b in quant_protocol_bits(quant) if p == protocol)
        name = quant_column_name(protocol, bits)
        figures.append(Figure(f"int8-degradation-vs-loss-{to_slug(protocol)}",
                              plots_int8.degradation_against_loss(quant, protocol, bits, by_config),
                              LOSS_CAPTION.format(name=name)))
    context = {
        "number": index,
        "protocols": protocol_list(protocols),
        "damage": damage_summary(quant),
        "kernel_check": kernel_check(quant),
        "by_config": config_table_context(config_table(quant, by_config), by_config, quant) if several_seeds else None,
        "per_run": quant_table_context(quant_table(quant, shown), shown, quant),
        "figures": [figure_context(f, f"{index}.{n}", links(f.stem)) for n, f in enumerate(figures, start=1)],
    }
    return context, figures


def protocol_list(protocols: list[str], tensors: dict[str, str] = QUANTISED_TENSORS) -> list[dict]:
    """Each protocol's short name, full name and the tensors it quantises (`tensors`: ofe's models',
    by default), for the templates."""
    return [
        {"short": PROTOCOL_SHORT.get(p, p), "name": plots_int8.PROTOCOL_NAMES.get(p, p),
         "tensors": tensors.get(p, "see ofe/core/quant.py")}
        for p in protocols
    ]


def int8_section(index: int, quant: pd.DataFrame, grid: list[str], links: Links) -> tuple[str, list[Figure]]:
    """The int8 section alone, as HTML (the page includes the same template), and its figures."""
    context, figures = int8_context(index, quant, grid, links)
    return render("int8.html.j2", int8=context), figures


def quant_table_context(table: pd.DataFrame, id_columns: list[str], quant: pd.DataFrame) -> dict:
    """`quant_table` for the `table` macro: ppl_q cells carry their change relative to ppl fp; the status
    column appears only when some run did not complete; the row's tooltip is its run_id."""
    q_columns = [quant_column_name(p, b) for p, b in quant_protocol_bits(quant)]
    with_status = bool((table["status"].fillna("missing") != "completed").any())
    header = [*id_columns, *(["status"] if with_status else []), "val loss", "mean Kurt", "ppl fp", *q_columns]
    rows = []
    for run in table.to_dict("records"):
        cells = [cell(fmt_value(run.get(c))) for c in id_columns]
        if with_status:
            status = str(run.get("status"))
            cells.append(cell(status, f"status-{to_slug(status)}"))
        cells.append(cell(fmt_number(run.get("final_val_loss"), ".3f") or "-", "num"))
        cells.append(cell(fmt_number(run.get("mean_kurtosis"), ".3g") or "-", "num"))
        cells.append(perplexity_cell(run.get("ppl_fp")))
        cells += [perplexity_cell(run.get(column), reference=run.get("ppl_fp")) for column in q_columns]
        rows.append({"title": str(run["run_id"]), "cells": cells})
    return {"cls": "quant", "header": header, "rows": rows}


def config_table_context(table: pd.DataFrame, id_columns: list[str], quant: pd.DataFrame) -> dict:
    """`config_table` for the `table` macro: "mean ± std" cells (the value alone for one seed), relative
    changes in %."""
    q_columns = [quant_column_name(p, b) for p, b in quant_protocol_bits(quant)]
    measures = [("final_val_loss", "val loss", ".3f", False), ("mean_kurtosis", "mean Kurt", ".3g", False),
                ("ppl_fp", "ppl fp", ".2f", False), *[(c, f"{c} change", ".2f", True) for c in q_columns]]
    rows = []
    for row in table.to_dict("records"):
        cells = [cell(row.get(c)) for c in id_columns] + [cell(row["n"], "num")]
        for name, _, fmt, percent in measures:
            cells.append(spread_cell(*(row[f"{name} {s}"] for s in ("mean", "std", "min", "max")), fmt, percent))
        rows.append({"title": None, "cells": cells})
    header = [*id_columns, "n", *[label for _, label, _, _ in measures]]
    return {"cls": "quant-config", "header": header, "rows": rows}


def perplexity_cell(value: object, reference: object = None) -> dict:
    """A perplexity cell ("-" if missing), with its relative change to `reference` when both are finite."""
    try:
        ppl = float(value)
    except (TypeError, ValueError):
        return cell("-", "num")
    if math.isnan(ppl):
        return cell("-", "num")
    text = f"{ppl:.2f}" if abs(ppl) < 1e5 else f"{ppl:.3g}"
    try:
        rel = ppl / float(reference) - 1.0
    except (TypeError, ValueError, ZeroDivisionError):
        return cell(text, "num")
    if not math.isfinite(rel):
        return cell(text, "num")
    return cell(text, "num", rel=fmt_change(rel))


def fmt_change(rel: float) -> str:
    """A relative change as a signed percentage, with fewer decimals the larger it is: "+296%", "+1.9%",
    "-0.07%"."""
    pct = 100 * rel
    return f"{pct:+,.0f}%" if abs(pct) >= 100 else f"{pct:+.1f}%" if abs(pct) >= 1 else f"{pct:+.2f}%"
