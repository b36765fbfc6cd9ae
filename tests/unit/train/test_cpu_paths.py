"""The paths a GPU run takes, exercised on CPU: torch.compile, and bf16 autocast with fp32 metrics."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from ofe.core import metrics
from ofe.core.probe import collect, compute
from ofe.train.trainer import Trainer, train
from tests.helpers.runs import tiny_run


def _losses(run) -> np.ndarray:
    df = pd.read_parquet(run / "metrics.parquet")
    return df[(df.site == "train") & (df.metric == "loss")].sort_values("step").value.to_numpy()


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="torch.compile's CPU backend (inductor) needs a C compiler")
def test_compiled_training_follows_the_eager_run(data_dir, tmp_path):
    # one layer, 4 steps: compiling dominates (~25 s on 2 busy cores without inductor's cache, ~7 s more
    # per extra layer), and one block exercises every kind of op
    small = {"model": {"n_layer": 1}}
    eager = train(tiny_run(data_dir, train={"steps": 4}, **small), tmp_path / "eager")
    compiled = train(tiny_run(data_dir, train={"steps": 4, "compile": True}, **small), tmp_path / "compiled")
    assert eager["status"] == compiled["status"] == "completed"
    # inductor fuses and reorders fp32 reductions: close to eager, not bitwise (1e-4 is far above what
    # reordering gives over 4 steps (measured: 9e-8), and far below the loss's own change per step, ~1e-2)
    np.testing.assert_allclose(_losses(tmp_path / "compiled"), _losses(tmp_path / "eager"), rtol=1e-4)


def test_bf16_autocast_on_cpu_trains_and_metrics_stay_fp32(data_dir, tmp_path):
    # no Q/K biases: an fp32 bias added to the projection would promote q and k back to fp32
    cfg = tiny_run(data_dir, train={"steps": 24, "precision": "bf16", "log_every": 8, "eval_every": 12},
                   model={"qk_bias": False})
    trainer = Trainer(cfg, tmp_path)
    assert trainer.dtype is torch.bfloat16 and trainer.device.type == "cpu"
    summary = trainer.run()
    assert summary["status"] == "completed" and summary["precision"] == "bfloat16"
    loss = _losses(tmp_path)
    assert np.isfinite(loss).all() and len(loss) == 24
    assert loss[-6:].mean() < loss[:6].mean() - 0.3  # it learns: ~5.5 -> ~4.4 nats at this LR
    for name, p in trainer.model.named_parameters():  # autocast casts per op; the weights stay fp32
        assert p.dtype is torch.float32, name

    # the probe's activations are bf16 where autocast made them, its metrics fp32 functions of them
    x = trainer.data.probe_batch(cfg.train.probe_batch_size)
    with trainer._autocast():
        acts = collect(trainer.model, x)
    streams, qk = acts.streams, acts.qk
    assert qk[(0, "q")].dtype is torch.bfloat16  # autocast was on in the probe's forward pass
    eager = collect(trainer.model, x).streams  # the same weights in fp32: bf16 matmuls differ, slightly
    gap = ((streams[(1, "block_input")] - eager[(1, "block_input")]).norm() / eager[(1, "block_input")].norm()).item()
    assert 1e-5 < gap < 5e-2, gap
    rows = {(layer, site, m): v for layer, site, m, v in compute(trainer.model, acts)}
    for (layer, site), t in streams.items():
        s2 = t.double().reshape(-1, t.shape[-1]).pow(2).mean(0)  # float64 reference of Kurt
        np.testing.assert_allclose(rows[(layer, site, "kurtosis")], (s2.pow(2).mean() / s2.mean() ** 2).item(),
                                   rtol=1e-5)
    for i in range(cfg.model.n_layer):
        q, k = qk[(i, "q")], qk[(i, "k")]
        want = metrics.attention_entropy(q.double(), k.double())  # the same activations, exactly upcast
        assert rows[(i, "attention", "attention_entropy")] == pytest.approx(want, rel=1e-6)
    df = pd.read_parquet(tmp_path / "metrics.parquet")
    assert df.value.dtype == np.float64 and np.isfinite(df[df.metric == "kurtosis"].value).all()


@pytest.fixture
def tf32_flags():
    """torch's TF32 settings (the new per-backend API), restored after the test: they are process-wide."""
    b = torch.backends
    saved = b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision
    yield b
    b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision = saved


def test_a_trainer_turns_tf32_off_whatever_was_set_before(data_dir, tmp_path, tf32_flags):
    b = tf32_flags
    b.cuda.matmul.fp32_precision = b.cudnn.conv.fp32_precision = b.cudnn.rnn.fp32_precision = "tf32"
    Trainer(tiny_run(data_dir), tmp_path)
    assert b.cuda.matmul.fp32_precision == b.cudnn.conv.fp32_precision == b.cudnn.rnn.fp32_precision == "ieee"
    assert not b.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "highest"


def _fsdp_policies(model: torch.nn.Module) -> list:
    return [m._get_fsdp_state()._mp_policy for m in model.modules() if hasattr(m, "_get_fsdp_state")]


def test_fsdp_and_ddp_compute_bf16_alike_with_an_fp32_stream(data_dir, tmp_path):
    """bf16 is autocast on both paths: a one-process fsdp trainer and a plain one have fp32 weights and
    fp32 residual streams at every probe site, and train to the same losses and metrics (within bf16's
    rounding; here they agree to float precision, the same casts in the same order). Under fsdp no
    MixedPrecisionPolicy is set, on CUDA either (the wrap of a bf16 run for a CUDA device, checked
    without one: the policy is decided before any kernel runs)."""
    results = {}
    for p in ("ddp", "fsdp"):
        cfg = tiny_run(data_dir, train={"precision": "bf16", "parallel": p}, model={"qk_bias": False})
        tr = Trainer(cfg, tmp_path / p)
        assert all(t.dtype is torch.float32 for t in tr.model.state_dict().values() if t.is_floating_point())
        losses = []
        for _ in range(3):
            losses.append(tr.train_step()[0])
            tr.state.step += 1
        x = tr.data.probe_batch(4)
        with tr._autocast():
            acts = collect(tr.model, x)
        streams, qk = acts.streams, acts.qk
        assert {t.dtype for t in streams.values()} == {torch.float32}  # residual stream and norms in fp32
        assert qk[(0, "q")].dtype is torch.bfloat16  # the matmuls ran in bf16
        rows = {(layer, site, m): v for layer, site, m, v in compute(tr.model, acts)}
        if p == "fsdp":
            assert _fsdp_policies(tr.model) and all(pol.param_dtype is None for pol in _fsdp_policies(tr.model))
            from ofe.core.model import GPT
            from ofe.train import parallel

            on_cuda = parallel.wrap(GPT(cfg.model), cfg.train, torch.device("cuda"), tr.procs)
            assert all(pol.param_dtype is None and pol.reduce_dtype is None for pol in _fsdp_policies(on_cuda))
        tr.procs.shutdown()
        results[p] = losses, rows
    np.testing.assert_allclose(results["fsdp"][0], results["ddp"][0], rtol=4e-3)  # bf16's epsilon: 2^-8
    ddp_rows, fsdp_rows = results["ddp"][1], results["fsdp"][1]
    assert ddp_rows.keys() == fsdp_rows.keys()
    for key, want in ddp_rows.items():
        assert fsdp_rows[key] == pytest.approx(want, rel=4e-3, abs=1e-6), key
