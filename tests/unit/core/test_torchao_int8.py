"""`torchao_dynamic` (ofe.core.torchao_int8): a closed form of torchao's int8 recipe on a planted outlier,
the layers it quantises against those of the simulated `dynamic_per_token`, the integer kernel that runs,
the row it writes, and the import noise it keeps out of the logs.

The closed form transcribes torchao 0.18's recipe from its source, not from ofe's code:
`choose_qparams_affine` (SYMMETRIC, int8 bounds [-128, 127]) sets scale = absmax / ((127 - -128) / 2)
= absmax / 127.5; `quantize_affine` takes clamp(round(x / scale), -128, 127); `Int8Tensor`'s linear
multiplies the int8 values with int32 accumulation, then by the per-token and per-channel scales, then
adds the bias."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
import torch
from torch import nn

from ofe.config import ModelConfig, QuantConfig
from ofe.core import torchao_int8
from ofe.core.model import GPT
from ofe.core.quant import quantised_copy
from ofe.train.quantise import quantise_run
from ofe.train.trainer import train
from tests.helpers.runs import tiny_run


def _on_grid(q: torch.Tensor, scale: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Values whose int8 code is exactly `q`: scale * (q + u) with |u| <= 0.3, so no value sits near a
    rounding boundary and float32's rounding of the scale cannot move it to a neighbouring code."""
    u = (torch.rand(q.shape, generator=g, dtype=torch.float64) - 0.5) * 0.6
    return scale * (q.double() + u)


def test_int8_linear_with_a_planted_outlier_column_equals_the_closed_form():
    g = torch.Generator().manual_seed(0)
    tokens, d_in, d_out, outlier = 5, 16, 6, 3
    # activations: ordinary channels on levels -3..3 of their token's grid, one channel at the token's
    # absmax (x / scale = 127.5, rounded and clamped to 127): the outlier leaves the others 7 levels
    s_x = torch.rand(tokens, 1, generator=g, dtype=torch.float64) * 2 + 0.5
    qx = torch.randint(-3, 4, (tokens, d_in), generator=g)
    x = _on_grid(qx, s_x, g)
    x[:, outlier] = 127.5 * s_x[:, 0]
    qx[:, outlier] = 127
    # weights: one absmax per output channel, reached (positive) at column 0; the rest well inside
    s_w = torch.rand(d_out, 1, generator=g, dtype=torch.float64) * 0.01 + 0.001
    qw = torch.randint(-120, 121, (d_out, d_in), generator=g)
    w = _on_grid(qw, s_w, g)
    w[:, 0] = 127.5 * s_w[:, 0]
    qw[:, 0] = 127
    bias = torch.randn(d_out, generator=g, dtype=torch.float64)
    expected = (qx @ qw.T).double() * s_x * s_w.T + bias  # int64 products: exact

    layer = nn.Linear(d_in, d_out)
    with torch.no_grad():
        layer.weight.copy_(w.float())
        layer.bias.copy_(bias.float())
    q, n = torchao_int8.quantised_copy(nn.Sequential(layer))
    assert n == 1 and q[0].weight.qdata.dtype == torch.int8
    assert torch.equal(q[0].weight.qdata.long(), qw)  # the weight codes themselves
    with torch.no_grad():
        got = q(x.float())
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=2e-6)


def _gpt(**model) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, d_model=32, n_head=2, context=16, **model))


def test_torchao_quantises_exactly_the_linear_layers_the_simulated_dynamic_protocol_does():
    """Every nn.Linear (attention qkv and projection, MLP, the gate of gated attention), and nothing else:
    not the tied head (a matmul with the embedding table), not OSP's embedding projections."""
    model = _gpt(attention="gated_headwise", embed_proj=True)
    sim = quantised_copy(model, "dynamic_per_token", 8, QuantConfig(weight_range="absmax"), [])
    hooked = sorted(n for n, m in sim.named_modules() if isinstance(m, nn.Linear) and m._forward_pre_hooks)
    real = torchao_int8.quantised_copy(model)[0]
    assert sorted(torchao_int8.int8_weight_layers(real)) == hooked
    assert "blocks.0.attn.gate" in hooked and len(hooked) == 2 * 5  # qkv, proj, gate, fc, proj per block
    for name in ("wte.weight", "wpe.weight", "embed_proj_in.weight", "embed_proj_out.weight"):
        assert torch.equal(real.get_parameter(name), model.get_parameter(name)), name


def test_the_original_model_is_untouched_and_other_widths_are_refused():
    model = _gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 256, (2, 16))
    q = quantised_copy(model, "torchao_dynamic", 8, QuantConfig(), [])
    with torch.no_grad():
        assert not torch.equal(q(idx)[0], model(idx)[0])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and type(v) is torch.Tensor, k
    with pytest.raises(ValueError, match="bits must be 8, got 4"):
        quantised_copy(model, "torchao_dynamic", 4, QuantConfig(), [])


def test_the_linear_layers_run_an_integer_matmul_not_a_dequantised_one():
    """On a CPU each quantised layer calls torch._int_mm (int8 x int8 -> int32; oneDNN's s8 GEMM) once per
    forward; the only float matmul left is the tied head's."""
    model = _gpt()
    q, n = torchao_int8.quantised_copy(model)
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        q(idx)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::_int_mm") == n == 8
    assert counts.get("aten::mm") == 1  # the tied head (attention's products are bmm inside SDPA)


def test_quantise_run_measures_torchao_at_8_bits_only(data_dir, tmp_path):
    train(tiny_run(data_dir, train={"steps": 12}), tmp_path)
    cfg = QuantConfig(protocols=("dynamic_per_token", "torchao_dynamic"), bits=(8, 4), calib_batches=1,
                      eval_batches=1)
    df = quantise_run(tmp_path, cfg)
    assert list(zip(df.protocol, df.bits)) == [("dynamic_per_token", 8), ("dynamic_per_token", 4),
                                               ("torchao_dynamic", 8)]
    saved = pd.read_parquet(tmp_path / "quant.parquet")
    assert saved.ppl_q.notna().all() and saved.ppl_fp.nunique() == 1


def test_import_noise_filter_drops_only_the_named_messages():
    f = torchao_int8._DropMatching(torchao_int8._IMPORT_NOISE["torchao"])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("torchao", logging.WARNING, __file__, 1, msg, None, None)

    noise = "Failed to load /x/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load"
    assert not f.filter(record(noise))
    for real in ("Failed to load /x/site-packages/torchao/_C.so: undefined symbol",  # a CPU kernel library
                 "Skipping import of cpp extensions due to incompatible torch version"):
        assert f.filter(record(real)), real
    assert f.dropped == 1
