"""The report's checkpoint studies (pretrained checkpoints inspected over training), on synthetic tables
written with the aggregation's schemas: the charts' data and the int8 table against values computed here
from planted numbers, unknown steps, failed checkpoints, a config without runs, and checkpoint studies
beside training studies in config order."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import vl_convert

from ofe.io import METRIC_SCHEMA, write_parquet
from ofe.report.ckpt import load_checkpoint_tables
from ofe.report.page import build_report
from tests.helpers.report_html import chart_specs, page_section, spec_values, table_rows

STATIC, DYNAMIC = "static_per_tensor", "dynamic_per_token"
PAIRS = [(STATIC, 8), (STATIC, 4), (DYNAMIC, 8)]
TOKENS_PER_STEP = 2_097_152
RNG = np.random.default_rng(19)
PYTHIA_A, PYTHIA_B = "EleutherAI/pythia-14m", "EleutherAI/pythia-31m"
# (model, label, revision, step, n_layers, status, error, studies), in config order. The "pythia" study
# knows every step; the "local" study has checkpoints whose step is unknown.
CKPTS = [
    (PYTHIA_A, "pythia-14m", "step0", 0, 3, "completed", None, ["pythia"]),
    (PYTHIA_A, "pythia-14m", "step1000", 1000, 3, "completed", None, ["pythia"]),
    (PYTHIA_A, "pythia-14m", "step8000", 8000, 3, "failed", "Traceback\nOSError: revision step8000 not found",
     ["pythia"]),
    (PYTHIA_A, "pythia-14m", "step143000", 143000, 3, "completed", None, ["pythia"]),
    (PYTHIA_B, "pythia-31m", "step0", 0, 2, "completed", None, ["pythia"]),
    (PYTHIA_B, "pythia-31m", "step143000", 143000, 2, "completed", None, ["pythia"]),
    ("/data/ckpts/run-a", "run-a", None, None, 2, "completed", None, ["local"]),
    (PYTHIA_A, "pythia-14m", "main", None, 3, "completed", None, ["local"]),
    ("/data/ckpts/run-b", "run-b", None, 500, 2, "corrupt",
     "corrupt: metrics.parquet: Parquet magic bytes not found in footer", ["local"]),
]
CKPT_IDS = [f"{m.strip('/').replace('/', '--')}/{r or 'local'}" for m, _, r, *_ in CKPTS]
COMPLETED = [i for i, c in enumerate(CKPTS) if c[5] == "completed"]
# Planted block_input kurtosis per (checkpoint index, layer), other metrics and sites given other values,
# and perplexities: ppl fp and ppl_q per (protocol, bits).
KURT = {(i, layer): float(RNG.uniform(1.5, 80.0)) for i in COMPLETED for layer in range(CKPTS[i][4])}
PPL_FP = {i: float(RNG.uniform(15.0, 40.0)) for i in COMPLETED}
SUPER_WEIGHT = {3: (1, 517, 1302, -2.375)}  # (layer, row, col, value) of the one checkpoint that has one
PPL_Q = {(i, p, b): PPL_FP[i] * (1 + float(RNG.uniform(-0.002, 0.5 if b == 4 else 0.05)))
         for i in COMPLETED for p, b in PAIRS}
STUDY_META = {
    "pythia": {"name": "pythia", "title": "Pythia over training", "question": "When do outliers appear?",
               "kind": "checkpoints", "axes": [],
               "models": [{"name": PYTHIA_A, "label": "pythia-14m", "revisions": ["step0", "step1000", "step8000",
                                                                                    "step143000"]},
                          {"name": PYTHIA_B, "label": "pythia-31m", "revisions": ["step0", "step143000"]}]},
    "local": {"name": "local", "title": "Local folders", "question": "Which of our saves has outliers?",
              "kind": "checkpoints", "axes": [],
              "models": [{"name": "/data/ckpts/run-a", "label": "run-a", "revisions": [None]},
                         {"name": PYTHIA_A, "label": "pythia-14m", "revisions": ["main"]},
                         {"name": "/data/ckpts/run-b", "label": "run-b", "revisions": [None]}]},
    "blocks": {"name": "blocks", "title": "Norm blocks", "question": "Does OP avoid outliers?", "axes": ["block"],
               "kind": "runs"},
}
ID_SCHEMA = [("ckpt_id", pa.string()), ("model", pa.string()), ("label", pa.string()), ("revision", pa.string()),
             ("order", pa.int64()), ("step", pa.int64()), ("tokens", pa.int64())]
SCHEMAS = {
    "checkpoints": pa.schema([
        ("ckpt_id", pa.string()), ("studies", pa.list_(pa.string())), *ID_SCHEMA[1:], ("status", pa.string()),
        ("error", pa.string()), ("architecture", pa.string()), ("n_params", pa.int64()), ("n_layers", pa.int64()),
        ("resolved_commit", pa.string()), ("ppl_fp", pa.float64()), ("val_loss", pa.float64()),
        ("max_kurtosis", pa.float64()), ("mean_kurtosis", pa.float64()), ("wall_s", pa.float64()),
        ("super_weight_layer", pa.int64()), ("super_weight_row", pa.int64()), ("super_weight_col", pa.int64()),
        ("super_weight_value", pa.float64())]),
    "checkpoint_metrics": pa.schema([*ID_SCHEMA, ("layer", pa.int64()), ("site", pa.string()),
                                     ("metric", pa.string()), ("value", pa.float64())]),
    "checkpoint_quant": pa.schema([*ID_SCHEMA[:6], ("protocol", pa.string()), ("bits", pa.int64()),
                                   ("ppl_fp", pa.float64()), ("ppl_q", pa.float64()), ("delta", pa.float64()),
                                   ("max_kurtosis", pa.float64()), ("mean_kurtosis", pa.float64())]),
}
RUN_ID = "tiny/pre_ln/beta1/adamw/lr0.01/seed0"
RUNS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("block", pa.string()), ("studies", pa.list_(pa.string())), ("status", pa.string()),
    ("peak_kurtosis", pa.float64()), ("final_mean_kurtosis", pa.float64()), ("error", pa.string()),
    ("final_train_loss", pa.float64()), ("final_val_loss", pa.float64()), ("tokens_per_s", pa.float64()),
    ("wall_s", pa.float64()), ("steps_done", pa.int64())])
METRICS_SCHEMA = pa.schema([("run_id", pa.string()), ("block", pa.string()),
                            *zip(METRIC_SCHEMA.names, METRIC_SCHEMA.types)])


def _ids(i: int) -> dict:
    model, label, revision, step, *_ = CKPTS[i]
    return {"ckpt_id": CKPT_IDS[i], "model": model, "label": label, "revision": revision, "order": i, "step": step,
            "tokens": None if step is None or model.startswith("/") else step * TOKENS_PER_STEP}


def _kurt_summary(i: int) -> tuple[float, float]:
    """(max, mean) of the planted block_input kurtosis; the unembedding's input is planted lower."""
    values = [KURT[(i, layer)] for layer in range(CKPTS[i][4])]
    return max(values), float(np.mean(values))


def _checkpoint_tables() -> dict[str, pd.DataFrame]:
    ckpts, metrics, quant = [], [], []
    for i, (model, _, _, _, n_layers, status, error, studies) in enumerate(CKPTS):
        done = status == "completed"
        peak, mean = _kurt_summary(i) if done else (None, None)
        ckpts.append({**_ids(i), "studies": studies, "status": status, "error": error,
                      "architecture": "GPTNeoXForCausalLM" if done else None,
                      "n_params": 14_067_712 * n_layers if done else None, "n_layers": n_layers if done else None,
                      "resolved_commit": "f" * 40 if done else None, "ppl_fp": PPL_FP.get(i),
                      "val_loss": math.log(PPL_FP[i]) if done else None, "max_kurtosis": peak,
                      "mean_kurtosis": mean, "wall_s": 30.0 if done else None,
                      **dict(zip(("super_weight_layer", "super_weight_row", "super_weight_col", "super_weight_value"),
                                 SUPER_WEIGHT.get(i, (None,) * 4)))})
        if not done:
            continue
        for layer in range(n_layers):
            for metric in ("kurtosis", "rms", "max_median_ratio"):
                value = KURT[(i, layer)] if metric == "kurtosis" else 1000.0 + layer
                metrics.append({**_ids(i), "layer": layer, "site": "block_input", "metric": metric, "value": value})
            metrics.append({**_ids(i), "layer": layer, "site": "attention", "metric": "attention_entropy",
                            "value": 2.0})
        for site in ("unembed_input_pre_norm", "unembed_input"):
            metrics.append({**_ids(i), "layer": n_layers, "site": site, "metric": "kurtosis", "value": 1.01})
        metrics.append({**_ids(i), "layer": -1, "site": "val", "metric": "loss", "value": math.log(PPL_FP[i])})
        for protocol, bits in PAIRS:
            q = PPL_Q[(i, protocol, bits)]
            quant.append({**{k: v for k, v in _ids(i).items() if k != "tokens"}, "protocol": protocol, "bits": bits,
                          "ppl_fp": PPL_FP[i], "ppl_q": q, "delta": q - PPL_FP[i], "max_kurtosis": peak,
                          "mean_kurtosis": mean})
    return {"checkpoints": pd.DataFrame(ckpts), "checkpoint_metrics": pd.DataFrame(metrics),
            "checkpoint_quant": pd.DataFrame(quant)}


def _runs(with_run: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """runs.parquet and metrics.parquet: one completed training run of the "blocks" study, or none."""
    if not with_run:
        return pd.DataFrame(columns=RUNS_SCHEMA.names), pd.DataFrame(columns=METRICS_SCHEMA.names)
    runs = pd.DataFrame([{"run_id": RUN_ID, "block": "pre_ln", "studies": ["blocks"], "status": "completed",
                          "peak_kurtosis": 9.0, "final_mean_kurtosis": 4.0, "error": None, "final_train_loss": 3.1,
                          "final_val_loss": 3.2, "tokens_per_s": 1e4, "wall_s": 60.0, "steps_done": 10}])
    rows = [{"run_id": RUN_ID, "block": "pre_ln", "step": step, "tokens": 256 * step, "layer": layer,
             "site": site, "metric": metric, "value": 1.0 + step + layer}
            for step, (layer, site), metric in itertools.product(
                (0, 10), [(0, "block_input"), (1, "block_input"), (2, "unembed_input")],
                ("kurtosis", "max_median_ratio", "token_correlation"))]
    rows += [{"run_id": RUN_ID, "block": "pre_ln", "step": s, "tokens": 256 * s, "layer": -1, "site": site,
              "metric": "loss", "value": 4.0 - 0.1 * s} for s in (0, 10) for site in ("train", "val")]
    return runs, pd.DataFrame(rows)


def _write(results: Path, study_names: list[str], with_run: bool, checkpoint_files: bool = True) -> None:
    meta = {"studies": [STUDY_META[n] for n in study_names], "grid_columns": ["block"] if with_run else [],
            "provenance": {}, "config": {}}
    runs, metrics = _runs(with_run)
    write_parquet(runs, results / "runs.parquet", RUNS_SCHEMA, meta)
    write_parquet(metrics, results / "metrics.parquet", METRICS_SCHEMA, meta)
    if checkpoint_files:
        for name, frame in _checkpoint_tables().items():
            write_parquet(frame, results / f"{name}.parquet", SCHEMAS[name], meta)


def _build(tmp: Path, study_names: list[str], with_run: bool) -> str:
    _write(tmp / "results", study_names, with_run)
    return build_report(tmp / "results", tmp / "reports" / "index.html", png=False).read_text()


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Checkpoint studies on either side of a training study, in that config order."""
    return _build(tmp_path_factory.mktemp("ckpt"), ["pythia", "blocks", "local"], with_run=True)










def test_figure_1_holds_the_planted_kurtosis_per_model_step_and_layer(page: str) -> None:
    spec = chart_specs(page)["fig-pythia-kurtosis-over-checkpoints"]
    got = {(r["label"], r["step"], r["layer"]): r["value"] for r in spec_values(spec)}
    want = {(CKPTS[i][1], CKPTS[i][3], layer): value for (i, layer), value in KURT.items() if "pythia" in CKPTS[i][7]}
    assert got == want  # block_input kurtosis only: no other metric or site, nothing of the failed checkpoint
    encoding = spec["spec"]["encoding"]
    assert encoding["x"]["field"] == "step" and encoding["x"]["scale"]["type"] == "symlog"
    assert 0 in encoding["x"]["axis"]["values"]  # step 0 on the axis
    assert encoding["y"]["scale"]["type"] == "log"
    assert encoding["color"]["field"] == "layer" and encoding["color"]["title"] == "layer"
    assert encoding["color"]["scale"]["scheme"] == "viridis"
    assert spec["facet"]["field"] == "label" and spec["facet"]["sort"] == ["pythia-14m", "pythia-31m"]
    assert {"model", "revision", "step", "tokens", "layer", "value"} <= {t["field"] for t in encoding["tooltip"]}
    tokens = {r["step"]: r["tokens"] for r in spec_values(spec)}
    assert tokens[143000] == 143000 * TOKENS_PER_STEP


def test_layer_profile_draws_one_line_per_checkpoint(page: str) -> None:
    spec = chart_specs(page)["fig-pythia-layer-kurtosis-by-checkpoint"]
    got = {(r["ckpt_id"], r["layer"]): r["value"] for r in spec_values(spec)}
    assert got == {(CKPT_IDS[i], layer): v for (i, layer), v in KURT.items() if "pythia" in CKPTS[i][7]}
    encoding = spec["spec"]["encoding"]
    assert encoding["x"]["field"] == "layer" and encoding["y"]["scale"]["type"] == "log"
    assert encoding["color"]["field"] == "step" and encoding["detail"]["field"] == "ckpt_id"


def test_int8_table_gives_the_change_in_perplexity_per_checkpoint(page: str) -> None:
    section = page_section(page, "study-pythia")
    header, rows = table_rows(section.split("<h3>int8 quantisation</h3>")[1])
    assert header == ["model", "revision", "step", "status", "mean Kurt", "ppl fp", "static W8A8 change",
                      "static W4A4 change", "dynamic W8A8 change"]
    pythia = [i for i, c in enumerate(CKPTS) if "pythia" in c[7]]
    assert list(rows) == [CKPT_IDS[i] for i in pythia]  # config order, the failed one included
    for i in pythia:
        cells = rows[CKPT_IDS[i]]
        assert cells[:4] == [CKPTS[i][1], CKPTS[i][2], str(CKPTS[i][3]), CKPTS[i][5]]
        if i not in COMPLETED:
            assert cells[4:] == ["-"] * 5
            continue
        assert float(cells[5]) == pytest.approx(PPL_FP[i], abs=0.005)
        for (protocol, bits), text in zip(PAIRS, cells[6:]):
            percent = (PPL_Q[(i, protocol, bits)] / PPL_FP[i] - 1) * 100
            decimals = 0 if abs(percent) >= 100 else 1 if abs(percent) >= 1 else 2
            assert text == f"{percent:+.{decimals}f}%"


def test_int8_figure_plots_the_degradation_against_step(page: str) -> None:
    spec = chart_specs(page)["fig-pythia-int8-over-checkpoints"]
    got = {(r["label"], r["step"], r["protocol"], r["bits"]): r["degradation"] for r in spec_values(spec)}
    want = {(CKPTS[i][1], CKPTS[i][3], p, b): PPL_Q[(i, p, b)] / PPL_FP[i] - 1
            for i in COMPLETED if "pythia" in CKPTS[i][7] for p, b in PAIRS}
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k]) for k in want)
    assert spec["spec"]["encoding"]["x"]["field"] == "step" and spec["facet"]["field"] == "label"
    assert len({r["series"] for r in spec_values(spec)}) == len(PAIRS)


def test_unknown_steps_give_an_ordinal_checkpoint_axis(page: str) -> None:
    section = page_section(page, "study-local")
    specs = chart_specs(section)
    spec = specs["fig-local-kurtosis-over-checkpoints"]
    x = spec["spec"]["encoding"]["x"]
    assert x["field"] == "checkpoint" and x["type"] == "ordinal" and x["sort"] == {"field": "order", "op": "min"}
    assert spec["resolve"]["scale"]["x"] == "independent"
    # a local folder without a revision is named by its label
    assert {r["checkpoint"] for r in spec_values(spec)} == {"run-a", "main"}
    assert specs["fig-local-int8-over-checkpoints"]["spec"]["encoding"]["x"]["field"] == "checkpoint"
    assert "The training step of 2 of the study" in section
    caption = re.search(r'id="fig-local-kurtosis-over-checkpoints">.*?<figcaption>(.*?)</figcaption>', section, re.S)
    assert "config order (steps unknown)" in caption.group(1) and "symlog" not in caption.group(1)
    assert "unknown" not in page_section(page, "study-pythia")


def test_failed_and_corrupt_checkpoints_show_their_error(page: str) -> None:
    header, rows = table_rows(page_section(page, "study-pythia").split("<h3>Checkpoints</h3>")[1])
    assert header == ["model", "revision", "step", "tokens", "status", "params", "layers", "ppl fp", "max Kurt",
                      "mean Kurt", "super weight", "error"]
    failed = rows[CKPT_IDS[2]]
    assert failed[4] == "failed" and failed[-1] == "OSError: revision step8000 not found"
    assert failed[5:10] == ["-"] * 5
    done = rows[CKPT_IDS[3]]
    peak, mean = _kurt_summary(3)
    assert done[2:5] == ["143000", f"{143000 * TOKENS_PER_STEP / 1e9:.3g}B", "completed"]
    assert done[8:] == [f"{peak:.3g}", f"{mean:.3g}", "layer 1 (517, 1302)", ""]
    assert rows[CKPT_IDS[1]][10] == "-"  # completed, with no super weight found
    assert 'title="weight -2.375"' in page_section(page, "study-pythia")  # its value in the tooltip
    _, local = table_rows(page_section(page, "study-local").split("<h3>Checkpoints</h3>")[1])
    assert local[CKPT_IDS[8]][4] == "corrupt" and "Parquet magic bytes" in local[CKPT_IDS[8]][-1]
    assert local[CKPT_IDS[6]][1:3] == ["-", "-"]  # no revision, no step


def test_checkpoint_studies_render_in_config_order_beside_training_studies(page: str) -> None:
    order = [page.index(f'<section id="study-{name}">') for name in ("pythia", "blocks", "local")]
    assert order == sorted(order) and order[-1] < page.index('<section id="runs">')
    assert "<h2>1. Pythia over training</h2>" in page and "<h2>2. Norm blocks</h2>" in page
    assert "<h2>3. Local folders</h2>" in page
    assert "Figure 1.1 (headline)." in page_section(page, "study-pythia")
    assert "Figure 3.1 (headline)." in page_section(page, "study-local")
    assert "fig-blocks-kurtosis-over-steps" in page_section(page, "study-blocks")  # the training study as before
    front = page[: page.index('<section id="study-')]
    assert "1 runs: 1 completed." in front
    assert "9 checkpoints: 7 completed, 1 failed, 1 corrupt." in front
    assert "2 of 9 checkpoints have no results (1 failed, 1 corrupt)" in front
    grid = re.search(r'<table class="grid">(.*?)</table>', front, re.S).group(1)
    assert "<code>pythia-14m</code>: step0, step1000, step8000, step143000" in grid
    assert "6 checkpoints" in grid
    specs = chart_specs(page)
    assert len(specs) == len(set(specs))
    for stem, spec in specs.items():
        if "checkpoints" in stem or "checkpoint" in stem:
            assert "<svg" in vl_convert.vegalite_to_svg(spec), stem


def test_a_config_of_checkpoint_studies_alone_renders(tmp_path: Path) -> None:
    html = _build(tmp_path, ["pythia", "local"], with_run=False)
    front = html[: html.index('<section id="study-')]
    assert "runs:" not in front and "9 checkpoints" in front
    assert "<b>Partial results:</b> 2 of 9 checkpoints have no results" in front
    assert 'id="runs"' not in html and 'id="int8"' not in html
    figures = sorted(p.name for p in (tmp_path / "reports" / "figures").iterdir())
    assert figures == sorted(f"{s}-{f}.svg" for s in ("pythia", "local") for f in (
        "kurtosis-over-checkpoints", "layer-kurtosis-by-checkpoint", "int8-over-checkpoints"))


def test_absent_checkpoint_tables_read_as_empty(tmp_path: Path) -> None:
    tables = load_checkpoint_tables(tmp_path)
    assert tables.checkpoints.empty and tables.metrics.empty and tables.quant.empty
    _write(tmp_path / "results", ["blocks"], with_run=True, checkpoint_files=False)
    html = build_report(tmp_path / "results", tmp_path / "index.html", png=False).read_text()
    assert "checkpoints" not in html.split("</head>")[1].split('<section id="runs">')[0].lower()


def test_a_checkpoint_study_without_results_says_no_data(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _write(results, ["pythia"], with_run=False)
    ckpts = pd.read_parquet(results / "checkpoints.parquet").assign(status="missing")
    for column in ("ppl_fp", "max_kurtosis", "mean_kurtosis"):
        ckpts[column] = math.nan
    write_parquet(ckpts, results / "checkpoints.parquet", SCHEMAS["checkpoints"])
    for name in ("checkpoint_metrics", "checkpoint_quant"):
        write_parquet(pd.DataFrame(columns=SCHEMAS[name].names), results / f"{name}.parquet", SCHEMAS[name])
    section = page_section(build_report(results, tmp_path / "index.html", png=False).read_text(), "study-pythia")
    assert "No checkpoint of this study has been inspected yet" in section and "<h3>int8" not in section
    specs = chart_specs(section)
    assert len(specs) == 2 and all(spec_values(s) == [{"text": "no data"}] for s in specs.values())
