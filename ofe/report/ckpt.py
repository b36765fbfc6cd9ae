"""The report's sections of checkpoint studies: pretrained checkpoints (a model's revisions over
training, or local folders) inspected one by one, instead of a grid of training runs.

A checkpoint study's section: its checkpoints (model, revision, step, tokens, status, size, fp
perplexity, kurtosis, the error of one that failed), kurtosis per layer against the training step (the
paper's Figure 1 view, the headline), the per-layer kurtosis profile of each checkpoint, where the
metrics carry it the attention-sink rate against the step (Gu et al.'s view; inspections from before
the metric have no such figure), and where quantisation results exist, int8 degradation against the
step and a table of the change in perplexity per protocol and bit width.

It reads the three tables the aggregation writes beside runs.parquet (`checkpoints.parquet`,
`checkpoint_metrics.parquet`, `checkpoint_quant.parquet`); results folders from before checkpoint
studies existed have none of them, and read as no checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd

from ofe.io import HF_NOT_QUANTISED, HF_QUANTISED_TENSORS

from ofe.report.htmlparts import Figure, Links, as_list, cell, figure_context, fmt_number, to_slug
from ofe.report.int8 import fmt_change, perplexity_cell, protocol_list, quant_column_name, quant_protocol_bits
from ofe.report.plots import ckpt as plots_ckpt
from ofe.report.sections import duration, status_counts
from ofe.report.tables import last_line

TABLE_FILES = {"checkpoints": "checkpoints.parquet", "metrics": "checkpoint_metrics.parquet",
               "quant": "checkpoint_quant.parquet"}
KURT_SHORT = "Kurt = the paper's uncentred kurtosis of the neuron RMS values (1 = no outlier features)"
# Captions, with {x} and {colour} filled in by whether the study's steps are known (`AXIS`).
CAPTIONS = {
    "kurtosis-over-checkpoints": (
        "Kurt per layer (residual stream entering each decoder layer) against {x}, one panel per model, "
        "colour = layer; y log scale; " + KURT_SHORT + "."
    ),
    "layer-kurtosis-by-checkpoint": (
        "Kurt per layer at each checkpoint, one panel per model, colour = {colour}: the last checkpoint is "
        "the final per-layer profile; y log scale; " + KURT_SHORT + "."
    ),
    "sink-rate-over-checkpoints": (
        "Attention-sink rate averaged over layers against {x}, one line per model: the share of (sequence, "
        "layer, head) triples whose mean attention weight on the first token exceeds 0.3 (Gu et al. 2024)."
    ),
    "int8-over-checkpoints": (
        "Relative perplexity degradation after quantisation (ppl_q / ppl_fp - 1, in %) against {x}, one "
        "line per protocol and bit width, one panel per model."
    ),
}
AXIS = {
    True: {"x": "the checkpoint's training step (symlog scale: step 0 shows)",
           "colour": "training step (dark = early)"},
    False: {"x": "the checkpoint in config order (steps unknown)",
            "colour": "checkpoint in config order (dark = first)"},
}
STEPS_UNKNOWN = (
    "The training step of {n} of the study's checkpoints is unknown (a revision not named stepN, and no "
    "step: given in config.yaml), so the figures place the checkpoints in config order, not by step."
)
DONE = "completed"


@dataclasses.dataclass(frozen=True)
class CheckpointTables:
    """The three aggregated checkpoint tables (empty frames where a file is absent)."""

    checkpoints: pd.DataFrame
    metrics: pd.DataFrame
    quant: pd.DataFrame

    def of_study(self, name: str) -> CheckpointTables:
        """The checkpoints whose `studies` list holds `name`, in config order, and their rows; a model
        label shared by two models is replaced by the models' names, so that one panel is one model."""
        ckpts = self.checkpoints
        if ckpts.empty:
            return CheckpointTables(ckpts, pd.DataFrame(), pd.DataFrame())
        ckpts = ckpts[ckpts["studies"].map(lambda names: name in as_list(names))]
        ckpts = ckpts.sort_values("order", kind="stable").reset_index(drop=True)
        labels = _display_labels(ckpts)
        ids = set(ckpts["ckpt_id"])

        def rows(df: pd.DataFrame) -> pd.DataFrame:
            if df.empty:
                return df
            df = df[df["ckpt_id"].isin(ids)]
            return df.assign(label=df["model"].map(labels))

        return CheckpointTables(ckpts.assign(label=ckpts["model"].map(labels)), rows(self.metrics), rows(self.quant))


def load_checkpoint_tables(results_dir: Path | str) -> CheckpointTables:
    """`results_dir`'s checkpoint tables; an absent file reads as an empty frame."""
    frames = {}
    for key, name in TABLE_FILES.items():
        path = Path(results_dir) / name
        frames[key] = pd.read_parquet(path) if path.exists() else pd.DataFrame()
    return CheckpointTables(**frames)


def checkpoint_section(
    index: int, name: str, slug: str, study: dict, tables: CheckpointTables, links: Links
) -> tuple[dict, list[Figure]]:
    """What checkpoints.html.j2 writes for one checkpoint study (also its row of the front page's
    summary), and its figures, headline first."""
    own = tables.of_study(name)
    ckpts = own.checkpoints
    # Every figure of the study uses one x axis, decided over all its checkpoints: a failed checkpoint
    # with an unknown step still says that the study's steps are not all known.
    by_step = plots_ckpt.steps_known(ckpts)
    unknown = int(ckpts["step"].isna().sum()) if not ckpts.empty else 0
    steps_note = STEPS_UNKNOWN.format(n=unknown) if not by_step else ""
    axis = AXIS[by_step]
    charts = [
        ("kurtosis-over-checkpoints", plots_ckpt.kurtosis_over_checkpoints(own.metrics, by_step)),
        ("layer-kurtosis-by-checkpoint", plots_ckpt.layer_profile_by_checkpoint(own.metrics, by_step)),
    ]
    if not own.metrics.empty and bool((own.metrics["metric"] == "sink_rate").any()):
        charts.append(("sink-rate-over-checkpoints", plots_ckpt.sink_rate_over_checkpoints(own.metrics, by_step)))
    if not own.quant.empty:
        charts.append(("int8-over-checkpoints", plots_ckpt.int8_over_checkpoints(own.quant, by_step)))
    figures = [Figure(f"{slug}-{kind}", chart, CAPTIONS[kind].format(**axis), headline=(n == 0))
               for n, (kind, chart) in enumerate(charts)]
    protocols = list(dict.fromkeys(p for p, _ in quant_protocol_bits(own.quant))) if not own.quant.empty else []
    context = {
        "kind": "checkpoints",
        "number": index,
        "slug": slug,
        "name": name,
        "title": study.get("title") or name,
        "question": study.get("question", ""),
        "axes": model_revisions(ckpts),
        "checkpoints": len(ckpts),
        "status": status_counts(ckpts) if len(ckpts) else "no checkpoints",
        "finished": bool((ckpts["status"] == DONE).any()) if len(ckpts) else False,
        "steps_note": steps_note,
        "table": checkpoint_table(ckpts),
        "figures": [figure_context(f, f"{index}.{n}", links(f.stem)) for n, f in enumerate(figures, start=1)],
        "int8": checkpoint_int8_table(ckpts, own.quant),
        # Checkpoints are transformers models, quantised by ofe.pretrained.quant: its statement of the tensors
        # (ofe.io.HF_QUANTISED_TENSORS).
        "protocols": protocol_list(protocols, HF_QUANTISED_TENSORS),
        "not_quantised": HF_NOT_QUANTISED,
    }
    return context, figures


def model_revisions(ckpts: pd.DataFrame) -> list[dict]:
    """Per model (its label), in config order, the revisions it is inspected at, for the front page."""
    out = []
    for label, group in ckpts.groupby("label", sort=False) if not ckpts.empty else []:
        revisions = [str(r) for r in group["revision"] if isinstance(r, str)]
        out.append({"name": label, "levels": ", ".join(revisions) or "local folder"})
    return out


def checkpoint_table(ckpts: pd.DataFrame) -> dict:
    """One row per checkpoint, in config order: what it is, whether it was inspected, its size, fp
    perplexity and kurtosis, the last line of its error; the row's tooltip is its ckpt_id."""
    header = ["model", "revision", "step", "tokens", "status", "params", "layers", "ppl fp", "max Kurt",
              "mean Kurt", "super weight", "error"]
    rows = []
    for ckpt in ckpts.to_dict("records"):
        status = str(ckpt.get("status"))
        model = str(ckpt["model"])
        cells = [
            cell(ckpt["label"], title=model if model != ckpt["label"] else None),
            cell(_text(ckpt.get("revision"))),
            cell(_integer(ckpt.get("step")), "num"),
            cell(_count(ckpt.get("tokens")), "num"),
            cell(status, f"status-{to_slug(status)}"),
            cell(_count(ckpt.get("n_params")), "num"),
            cell(_integer(ckpt.get("n_layers")), "num"),
            cell(fmt_number(ckpt.get("ppl_fp"), ".2f") or "-", "num"),
            cell(fmt_number(ckpt.get("max_kurtosis"), ".3g") or "-", "num"),
            cell(fmt_number(ckpt.get("mean_kurtosis"), ".3g") or "-", "num"),
            _super_weight_cell(ckpt),
            cell(last_line(ckpt.get("error")), "error"),
        ]
        rows.append({"title": str(ckpt["ckpt_id"]), "cells": cells})
    return {"cls": "checkpoints", "header": header, "rows": rows}


def checkpoint_int8_table(ckpts: pd.DataFrame, quant: pd.DataFrame) -> dict | None:
    """One row per checkpoint, in config order: mean Kurt, ppl fp, then per protocol and bit width the
    change in perplexity after quantisation, 100 (ppl_q / ppl_fp - 1) % (ppl_q in the cell's tooltip);
    a checkpoint without int8 results shows "-" (its status says why). None without int8 results."""
    if quant.empty:
        return None
    pairs = quant_protocol_bits(quant)
    ppl_q = quant.groupby(["ckpt_id", "protocol", "bits"])["ppl_q"].first().to_dict()
    ppl_fp = quant.groupby("ckpt_id")["ppl_fp"].first().to_dict()
    with_status = bool((ckpts["status"] != DONE).any())
    header = ["model", "revision", "step", *(["status"] if with_status else []), "mean Kurt", "ppl fp",
              *[f"{quant_column_name(p, b)} change" for p, b in pairs]]
    rows = []
    for ckpt in ckpts.to_dict("records"):
        ckpt_id = ckpt["ckpt_id"]
        cells = [cell(ckpt["label"]), cell(_text(ckpt.get("revision"))), cell(_integer(ckpt.get("step")), "num")]
        if with_status:
            status = str(ckpt.get("status"))
            cells.append(cell(status, f"status-{to_slug(status)}"))
        cells.append(cell(fmt_number(ckpt.get("mean_kurtosis"), ".3g") or "-", "num"))
        cells.append(perplexity_cell(ppl_fp.get(ckpt_id)))
        cells += [_change_cell(ppl_q.get((ckpt_id, p, b)), ppl_fp.get(ckpt_id)) for p, b in pairs]
        rows.append({"title": str(ckpt_id), "cells": cells})
    return {"cls": "quant-checkpoints", "header": header, "rows": rows}


def checkpoint_summary(checkpoints: pd.DataFrame) -> dict | None:
    """Checkpoint counts by status and inspection wall time for the front page (None without any)."""
    if checkpoints.empty:
        return None
    wall = pd.to_numeric(checkpoints.get("wall_s", pd.Series(dtype=float)), errors="coerce")
    text = f"Inspection wall time: {duration(wall.sum())} summed over checkpoints" if wall.notna().any() else ""
    return {"count": len(checkpoints), "status": status_counts(checkpoints), "wall": text}


def pending_checkpoints(checkpoints: pd.DataFrame) -> dict | None:
    """How many checkpoints have no results and why, for the partial-results banner (None when all did)."""
    if checkpoints.empty:
        return None
    pending = checkpoints[checkpoints["status"] != DONE]
    if pending.empty:
        return None
    return {"count": len(pending), "total": len(checkpoints), "status": status_counts(pending)}


def _change_cell(q: object, fp: object) -> dict:
    try:
        q, fp = float(q), float(fp)
        rel = q / fp - 1.0
    except (TypeError, ValueError, ZeroDivisionError):
        return cell("-", "num")
    if not math.isfinite(rel):
        return cell("-", "num")
    return cell(fmt_change(rel), "num", title=f"ppl after quantisation: {q:.2f}")


def _display_labels(ckpts: pd.DataFrame) -> dict[str, str]:
    """model -> the label its panel and rows show: its own, unless another model of the study shares it
    (two local folders with one basename), then the model as written."""
    pairs = ckpts[["model", "label"]].drop_duplicates("model")
    shared = pairs["label"].duplicated(keep=False)
    return dict(zip(pairs["model"], pairs["model"].where(shared, pairs["label"]).astype(str)))


def _super_weight_cell(ckpt: dict) -> dict:
    """The earliest super weight as "layer L (row, col)", its value in the tooltip; "-" where none was found."""
    layer, row, col = (_integer(ckpt.get(f"super_weight_{k}")) for k in ("layer", "row", "col"))
    if "-" in (layer, row, col):
        return cell("-")
    return cell(f"layer {layer} ({row}, {col})", title=f"weight {fmt_number(ckpt.get('super_weight_value'), '.4g')}")


def _text(value: object) -> str:
    return value if isinstance(value, str) and value else "-"


def _integer(value: object) -> str:
    """An integer column read back as float where it has nulls: "5000", or "-" when unknown."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(number) else str(int(number))


def _count(value: object) -> str:
    """A parameter or token count, e.g. "162M", "2.1B", "300B" ("-" when unknown)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "-"
    if math.isnan(number):
        return "-"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(number) >= size:
            return f"{number / size:.3g}{unit}"
    return f"{number:.0f}"

