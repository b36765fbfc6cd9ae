"""The super-weight detector (`ofe.pretrained.superweight`, Yu et al. 2024): the rule on planted peaks, the
weight read in each storage convention, a super weight planted in a tiny model of every family found at
exactly its layer and coordinates, and its way into inspect.json and the checkpoint table."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ofe.aggregate.checkpoints import read_checkpoint
from ofe.config import QuantConfig
from ofe.pretrained import hf, superweight
from ofe.pretrained.inspection import Settings, inspect
from ofe.pretrained.superweight import Peak, SuperWeight, find_super_weights, peak, weight_entry
from tests.helpers import hf_models

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("no_network")

ROW, COL = 5, 41  # COL < 64: Llama's tiny MLP width is 2 d


def test_peak_is_the_signed_largest_magnitude_entry_with_its_token_and_channel():
    x = torch.full((2, 4, 5), 0.5)
    x[1, 2, 3] = -7.0  # batch 1, position 2: token 1 * 4 + 2 = 6 of the flattened (batch, position)
    x[0, 0, 0] = 6.9
    assert peak(x) == Peak(-7.0, 3, 6)
    assert peak(x[1, 2]) == Peak(-7.0, 3, 0)  # one token


def test_rule_reports_every_layer_where_input_and_output_both_spike():
    """The authors' |value| > 50, strictly, on both the input and the output of the same layer; the row is
    the output's channel, the column the input's."""
    ins = [Peak(49.9, 1, 0), Peak(-60.0, 7003, 0), Peak(60.0, 2, 0), Peak(300.0, 9, 3), Peak(80.0, 4, 1)]
    outs = [Peak(900.0, 3, 0), Peak(-2000.0, 3968, 0), Peak(50.0, 2, 0), Peak(-51.0, 11, 3), Peak(1.0, 0, 0)]
    assert find_super_weights(ins, outs) == [SuperWeight(1, 3968, 7003), SuperWeight(3, 11, 9)]
    assert find_super_weights(ins, outs, threshold=10.0)[0] == SuperWeight(0, 3, 1)  # 49.9 spikes above 10
    assert superweight.headline({"found": [{"layer": 1}, {"layer": 3}]}) == {"layer": 1}
    assert superweight.headline({"found": []}) is None


def test_weight_entry_reads_linear_and_conv1d_at_the_same_coordinates():
    """GPT-2's Conv1D computes x @ W with W stored (in, out); nn.Linear x @ W^T with W (out, in): the same
    map has its (output row, input column) entry at [row, col] in one and [col, row] in the other."""
    from transformers.pytorch_utils import Conv1D

    linear = nn.Linear(5, 3)
    conv = Conv1D(3, 5)  # nf = 3 outputs, nx = 5 inputs
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias)
    x = torch.randn(4, 5)
    torch.testing.assert_close(conv(x), linear(x))
    assert weight_entry(conv, 2, 4) == weight_entry(linear, 2, 4) == linear.weight[2, 4].item()


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_a_planted_super_weight_is_found_at_its_layer_and_coordinates(family, layer):
    model = hf_models.plant_super_weight(hf_models.build(family), family, layer, ROW, COL, weight=5.0)
    idx = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(3))
    report = superweight.scan(hf.decoder_layers(model), model.config.model_type, lambda: hf.forward(model, idx))
    assert report["note"] is None and report["module"] == superweight.DOWN_PROJ.get(family, "mlp.down_proj")
    assert [f["layer"] for f in report["found"]] == [layer]
    found = report["found"][0]
    assert (found["row"], found["col"], found["weight"]) == (ROW, COL, 5.0)
    peaks = report["layers"][layer]
    assert peaks["input"]["channel"] == COL and peaks["output"]["channel"] == ROW
    # the output spike is the planted weight times the input spike, plus the other inputs' small share
    assert found["output"] == pytest.approx(5.0 * found["input"], rel=0.02)
    other = report["layers"][1 - layer]
    assert abs(other["input"]["value"]) < 1 and abs(other["output"]["value"]) < 1


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_a_random_model_has_no_super_weight(family):
    model = hf_models.build(family)
    idx = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(3))
    report = superweight.scan(hf.decoder_layers(model), model.config.model_type, lambda: hf.forward(model, idx))
    assert report["found"] == [] and report["note"] is None
    assert [p["layer"] for p in report["layers"]] == list(range(hf_models.LAYERS))


def test_a_family_without_the_down_projection_gets_a_note_not_a_crash():
    model = hf_models.build("gpt2")
    called = []
    report = superweight.scan(hf.decoder_layers(model), "some_moe", lambda: called.append(1))
    assert report["found"] == [] and report["layers"] == [] and not called
    assert "no down projection `mlp.down_proj`" in report["note"] and "'some_moe'" in report["note"]


def test_inspect_reports_the_super_weight_and_the_checkpoint_table_carries_it(tmp_path):
    tok = hf_models.tokenizer()
    model = hf_models.plant_super_weight(hf_models.build("llama"), "llama", 1, ROW, COL, weight=-4.0)
    folder = hf_models.save(model, tmp_path / "m", tok)
    text = hf_models.text_file(tmp_path)
    out = tmp_path / "out"
    summary = inspect(out, model=str(folder), text_file=text, settings=Settings(batches=1, batch_size=2, context=16),
                      quant=QuantConfig(protocols=()))
    written = json.loads((out / "inspect.json").read_text())
    assert written["super_weight"] == summary["super_weight"]
    sw = written["super_weight"]
    assert (sw["layer"], sw["row"], sw["col"], sw["weight"]) == (1, ROW, COL, -4.0)
    scan = written["super_weight_scan"]
    assert scan["prompt"] == superweight.PROMPT and scan["threshold"] == 50.0 and len(scan["layers"]) == 2
    assert written["notes"] == []
    got = read_checkpoint(out, {"model": str(folder), "revision": None, "step": None})
    assert got["status"] == "completed"
    assert (got["super_weight_layer"], got["super_weight_row"], got["super_weight_col"],
            got["super_weight_value"]) == (1, ROW, COL, -4.0)
