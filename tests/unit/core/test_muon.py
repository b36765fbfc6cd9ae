"""ofe.core.muon: torch.optim.Muon with Newton-Schulz in fp32 on CPU. Against independent references: a float64
transcription of Keller Jordan's quintic iteration and of Muon's step, and torch's own Muon (bf16)."""

from __future__ import annotations

import io
import math

import pytest
import torch

import ofe.core.muon
import ofe.core.optim
from ofe.config import OptimConfig
from ofe.core.muon import Muon, newton_schulz_dtype, zeropower_via_newtonschulz
from ofe.core.optim import build_optimizer
from tests.unit.core.test_optim import assert_same_state, gpt, gpt_loss, spectrum_gradient

KELLER = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic coefficients (his muon.py)


def newton_schulz_f64(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic iteration written from its definition, in float64: X0 = G / ||G||_F on the wide
    orientation, X <- a X + b (X X^T) X + c (X X^T)^2 X."""
    a, b, c = KELLER
    X = G.double()
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    X = X / X.norm()
    for _ in range(steps):
        A = X @ X.T
        X = a * X + b * A @ X + c * A @ A @ X
    return X.T if tall else X


def muon_step_f64(W, G, buf, lr, wd, momentum=0.95):
    """One Muon step from its definition (torch's docstring): B <- mu B + (1 - mu) G as a lerp,
    Nesterov G + mu (B - G), decoupled decay, then lr * 0.2 sqrt(max(rows, cols)) (match_rms_adamw)."""
    buf = buf + (1 - momentum) * (G - buf)
    update = G + momentum * (buf - G)
    W = W * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(W.shape)) * newton_schulz_f64(update)
    return W, buf


def gradient(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_newton_schulz_dtype_is_fp32_on_cpu_and_bf16_on_cuda():
    assert newton_schulz_dtype(torch.device("cpu")) == torch.float32
    assert newton_schulz_dtype(torch.device("cuda", 0)) == torch.bfloat16  # torch's choice kept


@pytest.mark.parametrize("shape", [(32, 32), (96, 32), (32, 80)])  # square, tall (qkv), wide (MLP proj)
def test_fp32_iteration_equals_the_quintic_in_float64(shape):
    G = gradient(*shape, seed=1)
    ours = zeropower_via_newtonschulz(G, KELLER, 5, 1e-7, torch.float32)
    assert ours.dtype == torch.float32 and ours.shape == G.shape
    assert rel(ours, newton_schulz_f64(G)) < 1e-5  # fp32 round-off only (measured ~1e-7)
    G.requires_grad_(False)
    assert torch.equal(G, gradient(*shape, seed=1))  # the input (maybe a momentum buffer) is untouched


def test_bf16_iteration_is_torchs_bit_for_bit():
    from torch.optim._muon import _zeropower_via_newtonschulz

    for shape in ((32, 32), (96, 32), (32, 80)):
        G = gradient(*shape, seed=2)
        assert torch.equal(zeropower_via_newtonschulz(G, KELLER, 5, 1e-7, torch.bfloat16),
                           _zeropower_via_newtonschulz(G, KELLER, 5, 1e-7))


def test_cpu_step_equals_muons_definition_in_float64():
    """Three steps with momentum, Nesterov, weight decay and match_rms_adamw, tall and wide matrices."""
    lr, wd = 0.02, 0.1
    ws = [torch.nn.Parameter(gradient(48, 16, 3)), torch.nn.Parameter(gradient(16, 40, 4))]
    opt = Muon(ws, lr=lr, weight_decay=wd, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
    ref = [(w.detach().double().clone(), torch.zeros_like(w, dtype=torch.float64)) for w in ws]
    for t in range(3):
        grads = [gradient(*w.shape, seed=10 * t + i) for i, w in enumerate(ws)]
        for w, g in zip(ws, grads):
            w.grad = g.clone()
        opt.step()
        ref = [muon_step_f64(W, g.double(), b, lr, wd) for (W, b), g in zip(ref, grads)]
    for w, (W, b) in zip(ws, ref):
        assert rel(w.detach(), W) < 1e-6
        assert rel(opt.state[w]["momentum_buffer"], b) < 1e-6


@pytest.mark.parametrize("conditioning", [None, 1e3])  # a Gaussian gradient; singular values over 1..1e3
@pytest.mark.parametrize("shape", [(64, 64), (192, 64), (64, 256)])  # the tiny preset's matrices
def test_cpu_fp32_update_equals_torchs_bf16_update_within_bf16(shape, conditioning):
    """The same gradient, one step: ofe's update (fp32) and torch.optim.Muon's (bf16). Their difference
    is bf16's own error: no larger than torch's distance from the exact (float64) iteration, while ofe's
    is over 50 times smaller. bf16 keeps 8 bits (relative spacing 2^-8 = 0.4%); through five iterations
    that measured 1.2-1.9% (Frobenius) on Gaussian gradients and 5-15% on ill-conditioned ones, whose
    small singular directions sit on the steep part of the quintic, which amplifies the round-off."""
    hp = {"lr": 0.02, "weight_decay": 0.1, "nesterov": True, "adjust_lr_fn": "match_rms_adamw"}
    w0 = gradient(*shape, seed=5)
    G = gradient(*shape, seed=6) if conditioning is None else spectrum_gradient(*shape, conditioning, seed=6)
    moved = {}
    for name, cls in (("ofe", Muon), ("torch", torch.optim.Muon)):
        w = torch.nn.Parameter(w0.clone())
        w.grad = G.clone()
        cls([w], **hp).step()
        moved[name] = w.detach() - w0
    exact, _ = muon_step_f64(w0.double(), G.double(), torch.zeros_like(G, dtype=torch.float64), 0.02, 0.1)
    exact -= w0.double()
    bf16_error = rel(moved["torch"], exact)
    assert rel(moved["ofe"], exact) < 1e-4 and bf16_error > 5e-3  # fp32: the weights' round-off only
    assert rel(moved["ofe"], moved["torch"]) < 1.01 * bf16_error
    assert bf16_error < (0.03 if conditioning is None else 0.2)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original", None])
def test_bf16_path_steps_exactly_as_torch_muon(monkeypatch, nesterov, adjust):
    """Where the iteration runs in bf16 (CUDA), every step equals torch.optim.Muon's bit for bit: momentum,
    Nesterov, weight decay and LR adjustment are torch's. The device is faked by forcing the dtype."""
    monkeypatch.setattr(ofe.core.muon, "newton_schulz_dtype", lambda device: torch.bfloat16)
    hp = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9, "nesterov": nesterov, "adjust_lr_fn": adjust}
    params = {}
    for name, cls in (("ofe", Muon), ("torch", torch.optim.Muon)):
        ws = [torch.nn.Parameter(gradient(48, 16, 7)), torch.nn.Parameter(gradient(16, 40, 8))]
        opt = cls(ws, **hp)
        for t in range(3):
            for i, w in enumerate(ws):
                w.grad = gradient(*w.shape, seed=20 * t + i)
            opt.step()
        params[name] = ws
    for a, b in zip(params["ofe"], params["torch"]):
        assert torch.equal(a, b)


def steps(model, opt, ts) -> None:
    for t in ts:
        opt.zero_grad(set_to_none=True)
        gpt_loss(model, t).backward()
        opt.step()


def saved(opt) -> dict:
    """A state_dict through torch.save and torch.load(weights_only=True), as checkpoints go."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def torch_muon_with_adamw(model, hp: OptimConfig, monkeypatch):
    """MuonWithAdamW as it was before ofe.core.muon: built on torch.optim.Muon itself."""
    with monkeypatch.context() as m:
        m.setattr(ofe.core.optim, "Muon", torch.optim.Muon)
        opt = build_optimizer(model, hp)
    assert type(opt.parts["muon"]) is torch.optim.Muon
    return opt


def test_state_of_a_run_made_with_torch_muon_loads_and_goes_both_ways(monkeypatch):
    """A checkpoint of a run from before ofe.core.muon loads into today's MuonWithAdamW with the same state,
    keys and groups, and steps on from its momentum; today's state loads into torch's."""
    hp = OptimConfig(name="muon", lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    old_model = gpt()
    old = torch_muon_with_adamw(old_model, hp, monkeypatch)
    steps(old_model, old, range(3))
    state = saved(old)
    model = gpt()
    model.load_state_dict(old_model.state_dict())
    new = build_optimizer(model, hp)
    assert type(new.parts["muon"]) is Muon
    new.load_state_dict(state)
    assert_same_state(new.state_dict(), state)
    assert {"momentum_buffer"} == {k for s in state["muon"]["state"].values() for k in s}
    # the next step starts from the loaded momentum: it is Muon's step from its definition (float64)
    muon = new.parts["muon"]
    new.zero_grad(set_to_none=True)
    gpt_loss(model, 3).backward()
    expected = [muon_step_f64(p.detach().double(), p.grad.double(), muon.state[p]["momentum_buffer"].double(),
                              hp.lr, hp.weight_decay) for p in muon.param_groups[0]["params"]]
    new.step()
    for p, (W, buf) in zip(muon.param_groups[0]["params"], expected):
        assert rel(p.detach(), W) < 1e-6 and rel(muon.state[p]["momentum_buffer"], buf) < 1e-6
    back = torch_muon_with_adamw(gpt(), hp, monkeypatch)
    back.load_state_dict(saved(new))
    assert_same_state(back.state_dict(), new.state_dict())
