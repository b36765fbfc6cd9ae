"""Seeds drawn as bands (mean line, min-max band) and tables by configuration (mean ± std, n), against
values computed here with numpy from planted numbers; and the page coming from its Jinja2 templates."""

from __future__ import annotations

import itertools
import math
import re
import statistics
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
import pytest
import vl_convert

from ofe.io import write_parquet
from ofe.report import htmlparts, plots
from ofe.report.page import build_report
from tests.helpers.report_html import spec_values

SEEDS = 3
STEPS = (0, 10, 20)
N_LAYERS = 2  # layers 0..1 at block_input, layer 2 at unembed_input
SITES = [(layer, "block_input") for layer in range(N_LAYERS)] + [(N_LAYERS, "unembed_input")]
MULTI, SINGLE = "block=pre_ln", "block=op"  # configurations: three seeds, one seed
RNG = np.random.default_rng(15)
# Planted per-layer values [seed, step, layer] of each metric for the three-seed configuration, and
# [step, layer] for the one-seed configuration; positive (log scales) and distinct across seeds.
PLANTED = {metric: RNG.uniform(1.5, 40.0, size=(SEEDS, len(STEPS), len(SITES)))
           for metric in ("kurtosis", "max_median_ratio")}
PLANTED["token_correlation"] = RNG.uniform(0.1, 0.9, size=(SEEDS, len(STEPS), len(SITES)))
PLANTED_SINGLE = {metric: values[0] * 0.5 for metric, values in PLANTED.items()}
TRAIN_LOSS = RNG.uniform(2.0, 5.0, size=(SEEDS, 21))  # [seed, step 0..20]
VAL_LOSS = RNG.uniform(2.0, 5.0, size=(SEEDS, 2))  # [seed, step 10 and 20]


def _metrics(seeds: int = SEEDS) -> pd.DataFrame:
    """The three-seed configuration (or its first `seeds` seeds) and the one-seed one, as the report
    passes them to the charts: grid columns and a `label` per run."""
    rows = []

    def add(run: tuple[str, str, int], step: int, layer: int, site: str, metric: str, value: float) -> None:
        run_id, block, seed = run
        rows.append({"run_id": run_id, "block": block, "lr": 0.01, "seed": seed, "label": f"block={block}",
                     "step": step, "tokens": 256 * step, "layer": layer, "site": site, "metric": metric,
                     "value": float(value)})

    for seed in range(seeds):
        run = (f"pre_ln/seed{seed}", "pre_ln", seed)
        for (s, step), (i, (layer, site)), metric in itertools.product(enumerate(STEPS), enumerate(SITES), PLANTED):
            add(run, step, layer, site, metric, PLANTED[metric][seed, s, i])
        for step in range(21):
            add(run, step, -1, "train", "loss", TRAIN_LOSS[seed, step])
        for v, step in enumerate((10, 20)):
            add(run, step, -1, "val", "loss", VAL_LOSS[seed, v])
    run = ("op/seed0", "op", 0)
    for (s, step), (i, (layer, site)), metric in itertools.product(enumerate(STEPS), enumerate(SITES), PLANTED):
        add(run, step, layer, site, metric, PLANTED_SINGLE[metric][s, i])
    for step in range(21):
        add(run, step, -1, "train", "loss", 3.0)
    return pd.DataFrame(rows)




def _marks(spec: dict) -> list[str]:
    """The mark type of every unit view of a spec, however nested (layers, facets)."""
    if "mark" in spec:
        mark = spec["mark"]
        return [mark if isinstance(mark, str) else mark["type"]]
    inner = spec.get("layer", []) + ([spec["spec"]] if "spec" in spec else [])
    return [m for part in inner for m in _marks(part)]


def _colour_legend_answers_clicks(spec: dict) -> bool:
    """Whether the colour legend of the compiled chart (configuration, or layer) still picks an entry when
    clicked: the legend-bound selection survives a band layer drawn first."""
    def legends(vega: dict) -> list[dict]:
        return vega.get("legends", []) + [lg for mark in vega.get("marks", []) for lg in legends(mark)]
    found = [lg for lg in legends(vl_convert.vegalite_to_vega(spec)) if lg.get("title") in ("configuration", "layer")]
    return len(found) == 1 and bool(found[0].get("encode", {}).get("symbols", {}).get("interactive"))


def _check_band(row: dict, planted: np.ndarray) -> None:
    """A band row against the planted values over seeds: mean, min, max and the seed count."""
    assert row["value"] == pytest.approx(float(np.mean(planted)))
    assert row["min"] == pytest.approx(float(np.min(planted)))
    assert row["max"] == pytest.approx(float(np.max(planted)))
    assert row["n"] == len(planted)


def test_kurtosis_over_steps_draws_the_seed_mean_with_a_min_max_band() -> None:
    spec = plots.kurtosis_over_steps(_metrics()).to_dict()
    assert _marks(spec) == ["area", "line"]  # the band under the mean line, in every panel
    rows = spec_values(spec)
    multi = {(r["layer"], r["step"]): r for r in rows if r["label"] == MULTI}
    assert len(multi) == len(SITES) * len(STEPS)
    for (s, step), (i, (layer, _)) in itertools.product(enumerate(STEPS), enumerate(SITES)):
        _check_band(multi[(layer, step)], PLANTED["kurtosis"][:, s, i])
    single = [r for r in rows if r["label"] == SINGLE]
    assert single and all(r["min"] == r["max"] == r["value"] and r["n"] == 1 for r in single)
    assert "band = min-max over 3 seeds" in " ".join(spec["title"]["subtitle"])
    assert _colour_legend_answers_clicks(spec)
    assert "<svg" in vl_convert.vegalite_to_svg(spec)


@pytest.mark.parametrize("metric, chart", [
    ("kurtosis", plots.final_layer_kurtosis),
    ("token_correlation", plots.final_layer_token_correlation),
    ("max_median_ratio", plots.final_layer_mmr),
])
def test_final_per_layer_charts_draw_the_seed_mean_with_a_min_max_band(metric, chart) -> None:
    spec = chart(_metrics()).to_dict()
    assert _marks(spec) == ["area", "line"]
    rows = {(r["label"], r["layer"]): r for r in spec_values(spec)}
    for i, (layer, _) in enumerate(SITES):
        _check_band(rows[(MULTI, layer)], PLANTED[metric][:, -1, i])  # the last step of every seed
        assert rows[(SINGLE, layer)]["value"] == pytest.approx(PLANTED_SINGLE[metric][-1, i])
    assert "band = min-max over 3 seeds" in " ".join(spec["title"]["subtitle"])
    assert _colour_legend_answers_clicks(spec)
    assert "<svg" in vl_convert.vegalite_to_svg(spec)


def test_loss_curves_draw_the_seed_mean_with_a_min_max_band() -> None:
    spec = plots.loss_curves(_metrics()).to_dict()
    assert sorted(_marks(spec)) == ["area", "area", "line", "line"]  # train and val, band and mean each
    rows = {(r["label"], r["site"], r["step"]): r for r in spec_values(spec)}
    for step in range(21):
        _check_band(rows[(MULTI, "train", step)], TRAIN_LOSS[:, step])
    for v, step in enumerate((10, 20)):
        _check_band(rows[(MULTI, "val", step)], VAL_LOSS[:, v])
    assert _colour_legend_answers_clicks(spec)
    assert "<svg" in vl_convert.vegalite_to_svg(spec)


@pytest.mark.parametrize("chart", [plots.kurtosis_over_steps, plots.final_layer_kurtosis,
                                   plots.final_layer_token_correlation, plots.final_layer_mmr, plots.loss_curves])
def test_one_seed_per_configuration_draws_no_band(chart) -> None:
    spec = chart(_metrics(seeds=1)).to_dict()
    assert "area" not in _marks(spec)
    assert all("min" not in row and "max" not in row for row in spec_values(spec))
    assert "band" not in " ".join(spec["title"]["subtitle"])


def _sweep_runs(seeds: int = SEEDS) -> tuple[pd.DataFrame, np.ndarray]:
    """pre_ln at three learning rates x `seeds` seeds, op at one learning rate and one seed; the planted
    peak kurtosis [seed, lr] of pre_ln."""
    lrs = (1e-3, 3e-3, 1e-2)
    peak = RNG.uniform(2.0, 50.0, size=(seeds, len(lrs)))
    rows = [{"run_id": f"pre_ln/lr{lr}/seed{seed}", "block": "pre_ln", "lr": lr, "seed": seed,
             "studies": ["lr"], "status": "completed", "peak_kurtosis": peak[seed, j],
             "final_mean_kurtosis": peak[seed, j] / 2, "final_val_loss": 3.0, "error": None}
            for seed, (j, lr) in itertools.product(range(seeds), enumerate(lrs))]
    rows.append({"run_id": "op/lr0.01/seed0", "block": "op", "lr": 1e-2, "seed": 0, "studies": ["lr"],
                 "status": "completed", "peak_kurtosis": 3.0, "final_mean_kurtosis": 1.5, "final_val_loss": 3.0,
                 "error": None})
    runs = pd.DataFrame(rows)
    return runs.assign(label="block=" + runs["block"]), peak


def test_sweep_draws_the_seed_mean_with_a_band_and_optional_points() -> None:
    runs, peak = _sweep_runs()
    spec = plots.sweep_lines(runs, "lr", band=True).to_dict()
    assert _marks(spec) == ["area", "line", "point"]
    means = {(r["label"], r["lr"], r["measure"]): r for r in spec_values(spec) if r["kind"] == "mean"}
    for j, lr in enumerate((1e-3, 3e-3, 1e-2)):
        _check_band(means[(MULTI, lr, "peak Kurt")], peak[:, j])
        _check_band(means[(MULTI, lr, "final mean Kurt")], peak[:, j] / 2)
    assert "band = min-max over 3 seeds" in " ".join(spec["title"]["subtitle"])
    assert _colour_legend_answers_clicks(spec)
    assert "<svg" in vl_convert.vegalite_to_svg(spec)
    assert _marks(plots.sweep_lines(runs, "lr", band=True, points=False).to_dict()) == ["area", "line"]
    # one seed per configuration: no band, whatever `band` says
    one_seed = plots.sweep_lines(_sweep_runs(seeds=1)[0], "lr", band=True).to_dict()
    assert _marks(one_seed) == ["line", "point"]
    assert all("min" not in row for row in spec_values(one_seed))


# ---- the page: tables by configuration, captions, templates ---------------------------------------

STUDY = {"title": "Seeds <&> bands", "question": "Do seeds agree?", "axes": ["block", "lr", "seed"]}
# (block, lr, seed) -> (final val loss, peak kurtosis, final mean kurtosis); one pre_ln seed diverged.
RUNS = {
    ("pre_ln", 0.01, 0): (2.80, 12.0, 6.0), ("pre_ln", 0.01, 1): (2.90, 20.0, 9.0),
    ("pre_ln", 0.01, 2): (math.nan, 16.0, 7.5),
    ("pre_ln", 0.003, 0): (2.70, 4.0, 2.0), ("pre_ln", 0.003, 1): (2.72, 5.0, 2.5),
    ("pre_ln", 0.003, 2): (2.74, 4.5, 2.2),
    ("op", 0.01, 0): (2.50, 2.1, 1.4),
}


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("seeds")
    runs, metrics, quant = [], [], []
    for (block, lr, seed), (loss, peak, final) in RUNS.items():
        run_id = f"tiny/{block}/lr{lr}/seed{seed}"
        status = "diverged" if math.isnan(loss) else "completed"
        grid = {"block": block, "lr": lr, "seed": seed}
        runs.append({"run_id": run_id, **grid, "studies": ["seeds"], "status": status, "final_val_loss": loss,
                     "peak_kurtosis": peak, "final_mean_kurtosis": final, "tokens_per_s": 1e4, "wall_s": 10.0,
                     "error": None})
        for step, (layer, site) in itertools.product(STEPS, SITES):
            metrics.append({"run_id": run_id, **grid, "step": step, "tokens": 256 * step, "layer": layer,
                            "site": site, "metric": "kurtosis", "value": final * (1 + step / 20)})
        quant.append({"run_id": run_id, **grid, "protocol": "static_per_tensor", "bits": 8, "ppl_fp": 16.0,
                      "ppl_q": 16.0 * (1 + final / 100), "delta": 0.16 * final, "mean_kurtosis": final,
                      "peak_kurtosis": peak, "status": status})
    meta = {"studies": {"seeds": STUDY}, "grid_columns": ["block", "lr", "seed"], "provenance": {}}
    write_parquet(pd.DataFrame(runs), root / "runs.parquet", metadata=meta)
    write_parquet(pd.DataFrame(metrics), root / "metrics.parquet", metadata=meta)
    write_parquet(pd.DataFrame(quant).astype({"bits": "int64"}), root / "quant.parquet", metadata=meta)
    return build_report(root, root / "reports" / "index.html", png=False).read_text()


def _cells(table_html: str) -> dict[str, list[str]]:
    """first cell -> cell texts of each row of a table."""
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(<td.*?)</tr>", table_html)]
    return {row[0]: row for row in rows}


def test_study_table_by_configuration_gives_mean_std_and_n(page: str) -> None:
    section = re.search(r'<section id="study-seeds">(.*?)</section>', page, re.S).group(1)
    table = re.search(r'<table class="by-config">(.*?)</table>', section, re.S).group(1)
    assert re.findall(r"<th>(.*?)</th>", table) == [
        "configuration", "n", "final val loss", "peak kurtosis", "final mean kurtosis"]
    rows = _cells(table)
    assert set(rows) == {"block=pre_ln, lr=0.01", "block=pre_ln, lr=0.003", "block=op, lr=0.01"}
    seeds = [v for k, v in RUNS.items() if k[:2] == ("pre_ln", 0.01)]
    peak = [p for _, p, _ in seeds]
    losses = [loss for loss, _, _ in seeds if not math.isnan(loss)]  # the diverged seed has none
    row = rows["block=pre_ln, lr=0.01"]
    assert row[1] == "3"
    assert row[2] == f"{statistics.mean(losses):.3f} ± {statistics.stdev(losses):.3f} (2 of 3)"
    assert row[3] == f"{statistics.mean(peak):.3g} ± {statistics.stdev(peak):.3g}"
    assert rows["block=op, lr=0.01"][1:] == ["1", "2.500", "2.1", "1.4"]  # one seed: its values alone
    assert f'title="range over seeds: {min(peak):.3g} to {max(peak):.3g}"' in section
    # the study's int8 table by configuration, before its table per run
    int8 = section.split("<h3>int8 quantisation</h3>")[1]
    assert int8.index('<table class="quant-config">') < int8.index('<table class="quant">')
    assert _cells(int8.split('<table class="quant-config">')[1].split("</table>")[0])[
        "block=pre_ln, lr=0.01"][1] == "3"


def test_study_captions_state_the_band_and_the_seed_count(page: str) -> None:
    captions = re.findall(r'<figure[^>]*>\n<div class="chart" id="fig-seeds-[^"]+"></div>.*?<figcaption>(.*?)'
                          r"</figcaption>", page, re.S)
    assert len(captions) == 6  # the sweep over lr and the five figures of every study
    assert all("band = min-max over 3 seeds" in caption for caption in captions)


def test_page_comes_from_the_templates_and_escapes_what_it_is_given(page: str) -> None:
    templates = Path(htmlparts.__file__).parent / "templates"
    assert {"page.html.j2", "study.html.j2", "int8.html.j2", "tables.html.j2"} <= {p.name for p in templates.iterdir()}
    # a marker only the page template writes (no Python module of the package contains it)
    marker = '<meta name="generator" content="ofe/templates/page.html.j2">'
    assert marker in page
    assert not any("ofe/templates/page.html.j2" in p.read_text() for p in templates.parents[1].rglob("*.py"))
    assert "Seeds &lt;&amp;&gt; bands" in page and "Seeds <&> bands" not in page
    # a variable the template uses but the context lacks is an error, not an empty string
    with pytest.raises(jinja2.UndefinedError, match="vega_bundle"):
        htmlparts.render("page.html.j2", title="x")
