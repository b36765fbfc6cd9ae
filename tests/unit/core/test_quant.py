"""Simulated quantisation against closed forms, an exact integer reference and planted outliers."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, replace

import pandas as pd
import pytest
import torch

from ofe.config import ModelConfig, QuantConfig
from ofe.core import quant as quant_mod
from ofe.core.model import GPT
from ofe.core.quant import (RangeObserver, asymmetric_params, fake_quant, quantise_per_token, quantise_weight,
                            quantised_copy, symmetric_limits, symmetric_scale)
from ofe.io import read_metadata
from ofe.plan import presets
from ofe.train import quantise as quantise_mod
from ofe.train.checkpoint import prepare_run_dir
from ofe.train.quantise import quantise_run
from ofe.train.trainer import train
from tests.helpers.runs import tiny_run


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_round_trip_error_is_at_most_half_a_step(bits):
    x = torch.randn(1000, dtype=torch.float64) * 3
    qmin, qmax = symmetric_limits(bits)
    scale = symmetric_scale(x, bits)
    assert (fake_quant(x, scale, 0.0, qmin, qmax) - x).abs().max() <= scale / 2 + 1e-12
    lo, hi = x.min().item(), x.max().item()
    s, z = asymmetric_params(lo, hi, bits)
    err = (fake_quant(x, torch.tensor(s, dtype=torch.float64), z, 0, 2**bits - 1) - x).abs().max()
    assert err <= s / 2 + 1e-9  # the zero point's rounding keeps [lo, hi] inside the grid


def test_symmetric_grid_represents_zero_and_clips_outside():
    qmin, qmax = symmetric_limits(8)
    assert (qmin, qmax) == (-127, 127)
    x = torch.tensor([0.0, 10.0, -10.0])
    assert fake_quant(x, torch.tensor(0.01), 0.0, qmin, qmax).tolist() == pytest.approx([0.0, 1.27, -1.27])


def test_per_channel_weights_are_never_worse_than_per_tensor():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        w = torch.randn(16, 32, generator=g) * torch.rand(16, 1, generator=g).mul(10).exp()  # rows differ in scale
        for method in ("absmax", "mse"):
            tensor_err = (quantise_weight(w, 8, False, method) - w).pow(2).sum()
            channel_err = (quantise_weight(w, 8, True, method) - w).pow(2).sum()
            assert channel_err <= tensor_err, (trial, method)


def test_mse_range_search_is_never_worse_than_absmax():
    w = torch.distributions.StudentT(2.0).sample((64, 64))  # heavy tails: clipping pays off
    for bits in (4, 8):
        mse = (quantise_weight(w, bits, False, "mse") - w).pow(2).sum()
        absmax = (quantise_weight(w, bits, False, "absmax") - w).pow(2).sum()
        assert mse <= absmax


def _linear_errors(x: torch.Tensor, calib: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """Relative output error of W8A8 x W^T: (static per-tensor, dynamic per-token)."""
    y = x @ w.T
    obs = RangeObserver(99.999)
    obs(calib)
    s, z = asymmetric_params(obs.lo, obs.hi, 8)
    static = fake_quant(x, torch.tensor(s), z, 0, 255) @ quantise_weight(w, 8, False).T
    dynamic = quantise_per_token(x, 8) @ quantise_weight(w, 8, True).T
    return ((static - y).norm() / y.norm()).item(), ((dynamic - y).norm() / y.norm()).item()


def test_planted_outlier_channel_breaks_static_per_tensor_quantisation():
    g = torch.Generator().manual_seed(1)
    d = 64
    w = torch.randn(32, d, generator=g) / math.sqrt(d)
    w[:, 5] = 0.0  # the outlier feature carries no signal into this layer, as for most of a model's heads
    x, calib = torch.randn(512, d, generator=g), torch.randn(512, d, generator=g)
    clean_static, clean_dynamic = _linear_errors(x, calib, w)
    x[:, 5] *= 100
    calib[:, 5] *= 100
    out_static, out_dynamic = _linear_errors(x, calib, w)
    assert clean_static < 0.02 and clean_dynamic < 0.02
    assert out_static > 20 * clean_static  # more than an order of magnitude
    assert out_dynamic < 0.5 * out_static  # per-token scales suffer less, but do suffer: see docs/int8.md


def test_planted_outlier_tokens_leave_dynamic_per_token_error_unchanged():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=g) / 8
    x, calib = torch.randn(512, 64, generator=g), torch.randn(512, 64, generator=g)
    clean_static, clean_dynamic = _linear_errors(x, calib, w)
    x[::64] *= 100
    calib[::64] *= 100
    out_static, out_dynamic = _linear_errors(x, calib, w)
    assert out_static > 3 * clean_static
    assert out_dynamic < 1.5 * clean_dynamic


def test_simulated_int8_matmul_equals_exact_integer_computation():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(8, 16, generator=g, dtype=torch.float64), torch.randn(4, 16, generator=g, dtype=torch.float64)
    s_x, z_x = asymmetric_params(x.min().item(), x.max().item(), 8)
    s_w = symmetric_scale(w, 8).item()
    f64 = dict(dtype=torch.float64)
    simulated = (fake_quant(x, torch.tensor(s_x, **f64), z_x, 0, 255)
                 @ fake_quant(w, torch.tensor(s_w, **f64), 0.0, -127, 127).T)
    # the integer path: uint8 activations minus zero point, int8 weights, int32 accumulation, one rescale
    x_int = torch.clamp(torch.round(x / s_x) + z_x, 0, 255).to(torch.int32) - int(z_x)
    w_int = torch.clamp(torch.round(w / s_w), -127, 127).to(torch.int32)
    acc = x_int @ w_int.T
    assert acc.dtype == torch.int32
    torch.testing.assert_close(simulated, acc.double() * (s_x * s_w), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("protocol", ["static_per_tensor", "dynamic_per_token"])
def test_quantising_leaves_the_original_model_untouched(protocol):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, d_model=32, n_head=2, context=16, **presets.op()["model"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 256, (2, 16))
    logits_before = model(idx)[0]
    q = quantised_copy(model, protocol, 4, QuantConfig(), [idx])
    assert not torch.equal(q(idx)[0], logits_before)  # the copy is quantised ...
    for k, v in model.state_dict().items():  # ... the original is not, nor does it carry hooks
        assert torch.equal(v, before[k])
    assert torch.equal(model(idx)[0], logits_before)
    assert torch.equal(q.wte.weight, model.wte.weight)  # the tied LM head stays in full precision


def test_quantise_run_writes_every_protocol_and_bit_width(data_dir, tmp_path):
    train(tiny_run(data_dir, train={"steps": 30}), tmp_path)
    cfg = QuantConfig(bits=(8, 4), calib_batches=2, eval_batches=2)
    df = quantise_run(tmp_path, cfg)
    saved = pd.read_parquet(tmp_path / "quant.parquet")
    pd.testing.assert_frame_equal(df, saved)
    assert set(zip(saved.protocol, saved.bits)) == {(p, b) for p in cfg.protocols for b in (8, 4)}
    assert saved.ppl_fp.nunique() == 1 and 1 < saved.ppl_fp.iloc[0] < 256
    by = saved.set_index(["protocol", "bits"]).ppl_q
    assert by[("static_per_tensor", 4)] > by[("static_per_tensor", 8)]  # fewer bits, more damage
    assert (saved.delta == saved.ppl_q - saved.ppl_fp).all()
    assert read_metadata(tmp_path / "quant.parquet")["quant"]["bits"] == [8, 4]


def test_diverged_run_gets_nan_rows(data_dir, tmp_path):
    cfg = tiny_run(data_dir, optim={"lr": 1e6, "warmup_frac": 0.0, "clip": None},
                   model={"norm": "none", "final_norm": "none"}, train={"steps": 50})
    assert train(cfg, tmp_path)["status"] == "diverged"
    df = quantise_run(tmp_path, QuantConfig(eval_batches=1, calib_batches=1))
    assert len(df) == 2 and df.ppl_q.isna().all()


def test_static_protocol_quantises_linear_outputs_attention_scores_and_probabilities():
    """Every tensor the protocol names leaves its hook on a grid of at most 2^bits values, and the copy
    computes attention explicitly (the fused kernel hides scores and probabilities); the original
    model keeps the fused path."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, d_model=32, n_head=2, context=16))
    idx = torch.randint(0, 256, (2, 16))
    bits = 3
    q = quantised_copy(model, "static_per_tensor", bits, QuantConfig(), [idx])
    assert all(b.attn.explicit for b in q.blocks) and not any(b.attn.explicit for b in model.blocks)
    seen: dict[str, torch.Tensor] = {}
    for name, module in [("scores", q.blocks[1].attn.scores), ("probs", q.blocks[1].attn.probs),
                         ("qkv out", q.blocks[1].attn.qkv_out), ("attn proj out", q.blocks[0].attn.proj),
                         ("mlp fc out", q.blocks[0].mlp.fc), ("mlp proj out", q.blocks[1].mlp.proj)]:
        # registered after the quantisation hook, so it sees the tensor as the next layer does
        module.register_forward_hook(lambda _m, _a, out, name=name: seen.__setitem__(name, out.detach()))
    with torch.no_grad():
        q(idx)
    assert set(seen) == {"scores", "probs", "qkv out", "attn proj out", "mlp fc out", "mlp proj out"}
    for name, tensor in seen.items():
        assert tensor.unique().numel() <= 2**bits, name
    # and in full precision the same taps carry many distinct values (the check above is not vacuous)
    model.blocks[1].attn.explicit = True
    fp: dict[str, torch.Tensor] = {}
    model.blocks[1].attn.scores.register_forward_hook(lambda _m, _a, out: fp.__setitem__("scores", out))
    with torch.no_grad():
        model(idx)
    assert fp["scores"].unique().numel() > 2**bits


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 100_003])
@pytest.mark.parametrize("q", [0.5, 0.9, 0.99999, 1.0])
def test_upper_quantile_equals_torch_quantile(n, q):
    """The partial-selection percentile equals torch.quantile (linear interpolation, fp32) at both tails."""
    from ofe.core.quant import upper_quantile

    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    assert upper_quantile(x, q) == pytest.approx(torch.quantile(x, q).item(), rel=1e-5, abs=1e-6)
    assert -upper_quantile(-x, q) == pytest.approx(torch.quantile(x, 1 - q).item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("protocol", ["static_per_tensor", "dynamic_per_token"])
def test_activation_quantisation_computes_on_the_activations_device_and_dtype(protocol, monkeypatch):
    """No hook brings a tensor of its own (a CPU scale would meet CUDA activations): every scale is a
    number or a tensor on the activation's device and of its dtype. The 'meta' device in float64
    stands in for a GPU: a float32 CPU scale would show."""
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (2, 16))
    q = quantised_copy(GPT(ModelConfig(n_layer=2, d_model=32, n_head=2, context=16)), protocol, 8,
                       QuantConfig(), [idx])
    calls, real = [], quant_mod.fake_quant

    def recording(x, scale, *args):
        calls.append((x, scale))
        return real(x, scale, *args)

    monkeypatch.setattr(quant_mod, "fake_quant", recording)
    q.to(device="meta", dtype=torch.float64)
    with torch.no_grad():
        logits = q(idx.to("meta"))[0]
    assert logits.device.type == "meta" and logits.dtype == torch.float64
    assert calls and all(x.device.type == "meta" and x.dtype == torch.float64 for x, _ in calls)
    assert all(isinstance(s, float) or (s.device == x.device and s.dtype == x.dtype) for x, s in calls)


# ---- one run's evaluation: device, resume ----------------------------------------------------------
ROWS = QuantConfig(bits=(8, 4), calib_batches=2, eval_batches=2)  # 4 rows: 2 protocols x 2 widths


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    """A completed run and its uninterrupted int8 table (quant.parquet then removed)."""
    run = tmp_path_factory.mktemp("finished")
    train(tiny_run(data_dir, train={"steps": 30}), run)
    table = quantise_run(run, ROWS, device=torch.device("cpu"))
    (run / "quant.parquet").unlink()
    return run, table


def _counting(monkeypatch, fail_at: int | None = None) -> list:
    """Record each quantised copy made as (protocol, bits); raise at call number `fail_at` (a kill)."""
    made, real = [], quantise_mod.quantised_copy

    def counting(model, protocol, bits, *args):
        if fail_at is not None and len(made) + 1 == fail_at:
            raise KeyboardInterrupt("killed")
        made.append((protocol, bits))
        return real(model, protocol, bits, *args)

    monkeypatch.setattr(quantise_mod, "quantised_copy", counting)
    return made


def test_interrupted_quantisation_resumes_with_the_missing_rows_only(finished, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    with monkeypatch.context() as m:
        before = _counting(m, fail_at=3)  # two rows measured, killed while making the third
        with pytest.raises(KeyboardInterrupt):
            quantise_run(run, ROWS, device="cpu")
    partial = json.loads((run / "quant.partial.json").read_text())
    assert [tuple(r[:2]) for r in partial["rows"]] == before == [("static_per_tensor", 8), ("static_per_tensor", 4)]
    assert not (run / "quant.parquet").exists()
    capsys.readouterr()
    after = _counting(monkeypatch)
    df = quantise_run(run, ROWS, device="cpu")
    assert after == [("dynamic_per_token", 8), ("dynamic_per_token", 4)]  # only the missing rows
    assert "resuming the int8 evaluation from quant.partial.json: 2 of 4 rows done" in capsys.readouterr().out
    pd.testing.assert_frame_equal(df, finished[1], check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(run / "quant.parquet"), finished[1], check_exact=True)
    assert not (run / "quant.partial.json").exists()


def _plant(run, rows, quant: QuantConfig = ROWS, identity: str | None = None) -> None:
    identity = identity or json.loads((run / "summary.json").read_text())["config_hash"]
    (run / "quant.partial.json").write_text(json.dumps({"config_hash": identity, "quant": asdict(quant),
                                                        "rows": rows}))


def test_a_complete_partial_file_is_the_table(finished, tmp_path, monkeypatch):
    """Killed after the last row but before quant.parquet: nothing is measured again, no model loaded;
    non-finite perplexities come back as they were."""
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    _plant(run, [["static_per_tensor", 8, 20.0, 21.0, 1.0], ["static_per_tensor", 4, 20.0, "inf", "inf"],
                 ["dynamic_per_token", 8, 20.0, 20.5, 0.5], ["dynamic_per_token", 4, 20.0, "nan", "nan"]])
    made = _counting(monkeypatch)
    monkeypatch.setattr(quantise_mod, "load_final_model", lambda *a, **k: pytest.fail("loaded the model"))
    df = quantise_run(run, ROWS, device="cpu")
    assert made == []
    want = pd.DataFrame([("static_per_tensor", 8, 20.0, 21.0, 1.0), ("static_per_tensor", 4, 20.0, math.inf, math.inf),
                         ("dynamic_per_token", 8, 20.0, 20.5, 0.5), ("dynamic_per_token", 4, 20.0, math.nan, math.nan)],
                        columns=["protocol", "bits", "ppl_fp", "ppl_q", "delta"])
    pd.testing.assert_frame_equal(df, want)
    assert not (run / "quant.partial.json").exists()


@pytest.mark.parametrize("other", ["quant settings", "run"])
def test_partial_rows_of_other_settings_or_another_run_are_measured_again(other, finished, tmp_path, monkeypatch,
                                                                          capsys):
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    rows = [["static_per_tensor", 8, 1e9, 1e9, 0.0], ["dynamic_per_token", 4, 1e9, 1e9, 0.0]]
    if other == "run":
        _plant(run, rows, identity="0" * 16)
    else:
        _plant(run, rows, quant=replace(ROWS, calib_batches=3))
    made = _counting(monkeypatch)
    df = quantise_run(run, ROWS, device="cpu")
    assert len(made) == 4
    pd.testing.assert_frame_equal(df, finished[1], check_exact=True)
    said = {"run": "holds rows of run 0000000000000000", "quant settings": "rows measured with other quant settings"}
    assert said[other] in capsys.readouterr().out


def test_run_folder_check_keeps_the_runs_partial_rows_and_moves_another_configs_aside(finished, tmp_path):
    """The trainer's folder check (first thing a requeued job does, when the run is not yet finished):
    the int8 rows measured for this run stay, those of another config go to stale/ like its other
    outputs, and a half-written partial file is removed."""
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    identity = json.loads((run / "summary.json").read_text())["config_hash"]
    _plant(run, [["static_per_tensor", 8, 20.0, 21.0, 1.0]])
    kept = (run / "quant.partial.json").read_text()
    (run / ".quant.partial.json.x1y2.tmp").write_text("{")
    prepare_run_dir(run, identity)
    assert (run / "quant.partial.json").read_text() == kept and not (run / ".quant.partial.json.x1y2.tmp").exists()
    assert not (run / "stale").exists()
    prepare_run_dir(run, "0" * 16)  # the folder reused by another config
    assert not (run / "quant.partial.json").exists()
    assert [p.read_text() for p in (run / "stale").glob("*/quant.partial.json")] == [kept]


def test_evaluation_device_defaults_to_the_runs_training_device(finished, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    asked = []

    def resolve(name, local_rank=0):
        asked.append((name, local_rank))
        return torch.device("cpu")

    monkeypatch.setattr(quantise_mod, "resolve_device", resolve)
    monkeypatch.setenv("LOCAL_RANK", "0")
    one = QuantConfig(protocols=("dynamic_per_token",), bits=(8,), calib_batches=1, eval_batches=1)
    trained_on = json.loads((run / "summary.json").read_text())["config"]["train"]["device"]
    quantise_run(run, one)
    assert asked == [(trained_on, 0)]  # train.device as training resolves it
    quantise_run(run, one, device=torch.device("cpu"))  # a device given is used as it is
    assert asked == [(trained_on, 0)]
