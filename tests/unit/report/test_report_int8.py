"""The int8 section's table by configuration (mean and spread over seeds), its statement of the quantised
tensors, and the degradation-against-loss figure, against values computed here from planted numbers."""

from __future__ import annotations

import re
import statistics

import pandas as pd
import pytest

from ofe.report.int8 import config_table, damage_summary, int8_section, kernel_check, quant_protocol_bits
from ofe.report.plots.int8 import degradation_against_loss

STATIC, DYNAMIC = "static_per_tensor", "dynamic_per_token"
# (block, optimizer) -> per seed: (val loss, mean kurtosis, ppl fp, static W8A8 ppl)
PLANTED = {
    ("pre_ln", "adamw"): [(2.00, 12.0, 8.0, 8.40), (2.10, 20.0, 8.5, 9.35), (1.95, 16.0, 7.9, 8.69)],
    ("op", "soap"): [(1.90, 1.2, 7.0, 7.007), (1.92, 1.3, 7.1, 7.1142), (1.88, 1.1, 6.9, 6.9069)],
}


def _quant(seeds: int = 3) -> pd.DataFrame:
    rows = []
    for (block, optimizer), runs in PLANTED.items():
        for seed, (loss, kurt, ppl_fp, ppl_q) in enumerate(runs[:seeds]):
            run_id = f"tiny/{block}/{optimizer}/seed{seed}"
            common = {"run_id": run_id, "block": block, "optimizer": optimizer, "seed": seed, "ppl_fp": ppl_fp,
                      "mean_kurtosis": kurt, "peak_kurtosis": 2 * kurt, "status": "completed",
                      "final_val_loss": loss}
            rows.append({**common, "protocol": STATIC, "bits": 8, "ppl_q": ppl_q, "delta": ppl_q - ppl_fp})
            rows.append({**common, "protocol": DYNAMIC, "bits": 8, "ppl_q": ppl_fp, "delta": 0.0})
    return pd.DataFrame(rows)


def test_config_table_gives_mean_std_and_range_over_seeds() -> None:
    table = config_table(_quant(), ["block", "optimizer"]).set_index("block")
    for (block, _), runs in PLANTED.items():
        change = [q / fp - 1 for _, _, fp, q in runs]
        row = table.loc[block]
        assert row["n"] == 3
        assert row["static W8A8 mean"] == pytest.approx(statistics.mean(change))
        assert row["static W8A8 std"] == pytest.approx(statistics.stdev(change))
        assert (row["static W8A8 min"], row["static W8A8 max"]) == pytest.approx((min(change), max(change)))
        assert row["final_val_loss mean"] == pytest.approx(statistics.mean(r[0] for r in runs))
        assert row["mean_kurtosis std"] == pytest.approx(statistics.stdev(r[1] for r in runs))
        assert row["dynamic W8A8 mean"] == pytest.approx(0.0)
    assert list(table.index) == ["op", "pre_ln"]  # sorted by mean kurtosis


def _section_html(quant: pd.DataFrame) -> tuple[str, list]:
    return int8_section(3, quant, ["block", "optimizer", "seed"], lambda stem: {})


def test_int8_section_shows_seed_spread_and_the_quantised_tensors() -> None:
    html, figures = _section_html(_quant())
    by_config = html.split('<table class="quant-config">')[1].split("</table>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", by_config, flags=re.S)
    cells = {re.findall(r"<td[^>]*>(.*?)</td>", r)[0]: re.findall(r"<td[^>]*>(.*?)</td>", r) for r in rows[1:]}
    change = [q / fp - 1 for _, _, fp, q in PLANTED[("pre_ln", "adamw")]]
    expected = f"+{100 * statistics.mean(change):.2f}% ± {100 * statistics.stdev(change):.2f}%"
    assert cells["pre_ln"][:2] == ["pre_ln", "adamw"] and cells["pre_ln"][2] == "3"
    assert expected.replace("±", "&#177;") in cells["pre_ln"] or expected in cells["pre_ln"]
    assert "attention scores and probabilities" in html and "per output channel" in html
    stems = [f.stem for f in figures]
    assert stems == ["int8-degradation-static_per_tensor", "int8-degradation-dynamic_per_token",
                     "int8-degradation-vs-loss-static_per_tensor"]


def test_one_seed_per_configuration_has_no_table_by_configuration() -> None:
    quant = _quant(seeds=1).drop(columns="seed")
    html, _ = int8_section(3, quant, ["block", "optimizer"], lambda stem: {})
    assert "quant-config" not in html and '<table class="quant">' in html


def test_degradation_against_loss_plots_each_run_at_its_loss() -> None:
    spec = degradation_against_loss(_quant(), STATIC, 8, ["block", "optimizer"]).to_dict()
    values = next(iter(spec["datasets"].values()))
    got = {(v["label"], round(v["final_val_loss"], 6)): v["degradation"] for v in values}
    want = {(f"{b} {o}", loss): q / fp - 1 for (b, o), runs in PLANTED.items() for loss, _, fp, q in runs}
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(want[k]) for k in want)
    assert spec["encoding"]["x"]["field"] == "final_val_loss"


def test_damage_summary_says_where_the_damage_sits() -> None:
    lines = damage_summary(_quant())
    # planted static W8A8 changes: pre_ln +5%, +10%, +10%; op +0.1% each -> 3 of 6 runs at 1% or more
    change = {f"tiny/{b}/{o}/seed{s}": q / fp - 1 for (b, o), runs in PLANTED.items()
              for s, (_, _, fp, q) in enumerate(runs)}
    worst = max(change, key=change.get)
    static = next(line for line in lines if line.startswith("static W8A8"))
    assert static.startswith("static W8A8: 3 of 6 runs lose 1% or more")
    assert f"{100 * change[worst]:+.2f}% ({worst}, mean Kurt 20)" in static
    dynamic = next(line for line in lines if line.startswith("dynamic W8A8"))
    assert dynamic.startswith("dynamic W8A8: 0 of 6 runs lose 1% or more") and "+0.00%" in dynamic


def test_torchao_follows_the_dynamic_protocol_it_checks_and_is_absent_without_rows() -> None:
    quant = _quant()
    assert kernel_check(quant) is None  # no torchao rows: no sentence
    extra = quant[quant.protocol == DYNAMIC].assign(protocol="torchao_dynamic", ppl_q=lambda d: d.ppl_fp * 1.002)
    six = quant[quant.protocol == STATIC].assign(bits=6)
    both = pd.concat([extra, six, quant], ignore_index=True)
    assert quant_protocol_bits(both) == [(STATIC, 8), (STATIC, 6), (DYNAMIC, 8), ("torchao_dynamic", 8)]
    # dynamic's planted ppl_q is ppl fp itself, so every run's gap is 0.2 % of ppl fp
    assert "differ by at most 0.20% of ppl fp over 6 runs" in kernel_check(both)
    html, figures = _section_html(both)
    assert "<b>torchao</b>" in html and "int8-degradation-torchao_dynamic" in [f.stem for f in figures]
