"""Optimisers against independent properties (docs/science.md section 3): SOAP is rotation-equivariant and
reduces to Adam on diagonal gradients; AdamW is not equivariant; Muon's update is orthogonalised and the
rest of the model takes Adam's steps; state round-trips exactly."""

from __future__ import annotations

import io
import math
import typing

import pandas as pd
import pytest
import torch
import yaml

from ofe.config import ModelConfig, OptimConfig
from ofe.core.model import GPT
from ofe.core.optim import OPTIMIZERS, build_optimizer, make_optimizer
from ofe.train.trainer import train
from tests.helpers import REPO
from tests.helpers.runs import Killed, kill_after, tiny_run

torch.set_default_dtype(torch.float32)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
    return q * torch.sign(torch.diagonal(r))


def least_squares(n: int = 6, seed: int = 0):
    """loss_t(W) = 0.5 ||A_t W B - C_t||^2 / batch: a square weight with full-rank gradients, and a new
    minibatch (A_t, C_t) each step. (With one fixed batch, SOAP's first update would see the very
    gradient its eigenbasis diagonalises, and Adam's sign-like first step would amplify round-off.)"""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g)
    batches = [(torch.randn(2 * n, n, generator=g), torch.randn(2 * n, n, generator=g)) for _ in range(64)]
    w0 = torch.randn(n, n, generator=g)

    def loss(W: torch.Tensor, t: int) -> torch.Tensor:
        A, C = batches[t % len(batches)]
        return 0.5 * (A @ W @ B - C).pow(2).sum() / len(A)

    return loss, w0


def run(name: str, loss_fn, w0: torch.Tensor, steps: int, **hp) -> torch.Tensor:
    """`steps` optimiser steps on loss_fn(W, t) from w0."""
    w = torch.nn.Parameter(w0.clone())
    opt = make_optimizer(name, [w], **hp)
    for t in range(steps):
        opt.zero_grad()
        loss_fn(w, t).backward()
        opt.step()
    return w.detach()


@pytest.mark.parametrize("name", ["soap", "rotated_adafactor"])
def test_rotated_preconditioners_are_rotation_equivariant(name):
    n = 6
    loss, w0 = least_squares(n)
    U, V = random_orthogonal(n, 1), random_orthogonal(n, 2)
    rotated_loss = lambda Wp, t: loss(U.T @ Wp @ V, t)  # noqa: E731  W' = U W V^T
    hp = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01, precondition_frequency=1)
    w = run(name, loss, w0, 12, **hp)
    wr = run(name, rotated_loss, U @ w0 @ V.T, 12, **hp)
    assert (w - w0).abs().max() > 0.05  # it moved
    torch.testing.assert_close(wr, U @ w @ V.T, atol=1e-4, rtol=1e-4)  # fp32 round-off


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_diagonal_preconditioners_are_not_rotation_equivariant(name):
    n = 6
    loss, w0 = least_squares(n)
    U, V = random_orthogonal(n, 1), random_orthogonal(n, 2)
    hp = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    w = run(name, loss, w0, 12, **hp)
    wr = run(name, lambda Wp, t: loss(U.T @ Wp @ V, t), U @ w0 @ V.T, 12, **hp)
    assert (wr - U @ w @ V.T).abs().max() > 1e-2


def test_soap_on_diagonal_gradients_equals_adam():
    n = 5
    g = torch.Generator().manual_seed(3)
    a, c = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)
    loss = lambda W, t: 0.5 * (a * torch.diagonal(W) - c).pow(2).sum()  # noqa: E731  gradient is diagonal
    w0 = torch.randn(n, n, generator=g)
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    steps = 25
    # SOAP's first step only computes its eigenbases, so its k+1 steps are Adam's k
    soap = run("soap", loss, w0, steps + 1, precondition_frequency=3, **hp)
    adam = run("adamw", loss, w0, steps, **hp)
    torch.testing.assert_close(soap, adam, atol=1e-6, rtol=1e-5)


def test_adafactor_on_rank_one_gradients_equals_adam():
    # G_t = s_t a b^T: G^2 = s_t^2 (a^2)(b^2)^T is rank one, so the factored second moment is exact.
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(4, generator=g), torch.randn(3, generator=g)
    loss = lambda W, t: torch.sin((torch.outer(a, b) * W).sum())  # noqa: E731  grad = cos(.) a b^T
    w0 = torch.randn(4, 3, generator=g)
    hp = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    torch.testing.assert_close(run("adafactor", loss, w0, 20, **hp), run("adamw", loss, w0, 20, **hp),
                               atol=1e-6, rtol=1e-5)


def test_soap_beats_adamw_on_an_ill_conditioned_quadratic():
    n = 8
    U1, V1, U2, V2 = (random_orthogonal(n, s) for s in range(10, 14))
    spectrum = torch.logspace(0, 2, n)  # condition number 100 on each side, in rotated coordinates
    A, B = U1 @ torch.diag(spectrum) @ V1.T, U2 @ torch.diag(spectrum) @ V2.T
    w_star = torch.randn(n, n, generator=torch.Generator().manual_seed(5))
    loss = lambda W, t=0: 0.5 * (A @ (W - w_star) @ B).pow(2).sum() / 1e4  # noqa: E731
    w0 = torch.zeros(n, n)
    hp = dict(lr=3e-2, betas=(0.9, 0.95), weight_decay=0.0)
    final = {name: loss(run(name, loss, w0, 200, **hp)).item() for name in ("soap", "adamw")}
    assert final["soap"] < 0.1 * final["adamw"], final


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_round_trips_exactly_through_a_checkpoint(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    x, y = torch.randn(16, 6), torch.randn(16, 3)

    def step(m, opt):
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()

    hp = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, precondition_frequency=2)
    opt = make_optimizer(name, model.parameters(), **hp)
    for _ in range(5):
        step(model, opt)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # as the trainer loads checkpoints
    clone = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    clone.load_state_dict(saved["model"])
    opt2 = make_optimizer(name, clone.parameters(), **hp)
    opt2.load_state_dict(saved["opt"])
    for _ in range(5):  # crosses a preconditioner refresh
        step(model, opt)
        step(clone, opt2)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="choose one of .*'soap'"):
        make_optimizer("sgdd", [torch.nn.Parameter(torch.zeros(1))], lr=1.0)


# ---- muon ---------------------------------------------------------------------------------------
def spectrum_gradient(rows: int, cols: int, condition: float, seed: int) -> torch.Tensor:
    """A gradient with singular values spread evenly (in log) over [1, condition], random directions."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(rows, rows, generator=g))[0][:, :min(rows, cols)]
    V = torch.linalg.qr(torch.randn(cols, cols, generator=g))[0][:, :min(rows, cols)]
    return U @ torch.diag(torch.logspace(0, math.log10(condition), min(rows, cols))) @ V.T


@pytest.mark.parametrize("shape", [(8, 8), (24, 8)])  # square, and tall like attention's qkv (3d x d)
def test_muon_update_is_orthogonalised(shape):
    rows, cols = shape
    G = spectrum_gradient(rows, cols, condition=100.0, seed=7)
    w = torch.nn.Parameter(torch.randn(rows, cols))
    before, lr = w.detach().clone(), 1e-2
    opt = make_optimizer("muon", [w], lr=lr, weight_decay=0.0)
    (G * w).sum().backward()  # the gradient is G itself
    opt.step()
    # match_rms_adamw scales the orthogonal factor by 0.2 sqrt(max(rows, cols)) (see ofe.core.optim)
    update = (before - w.detach()) / (lr * 0.2 * math.sqrt(max(rows, cols)))
    s = torch.linalg.svdvals(update)
    # Five quintic Newton-Schulz steps do not reach U V^T exactly: Keller Jordan's coefficients trade
    # convergence for speed and leave singular values in a band around 1 (measured 0.68-1.16 on such
    # gradients over 20 seeds in bf16, 0.70-1.13 in fp32, ofe.core.muon's CPU dtype). So: every one within
    # [0.6, 1.3], while the gradient's span 100x.
    assert s.min() > 0.6 and s.max() < 1.3, s
    assert torch.linalg.svdvals(G).max() / torch.linalg.svdvals(G).min() > 99
    # and the orthogonal factor is the gradient's: U V^T, up to that band (cosine similarity)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(update.flatten(), (U @ Vh).flatten(), dim=0) > 0.97


def test_muon_is_rotation_equivariant_up_to_round_off():
    """NS(U G V^T) = U NS(G) V^T, so Muon is equivariant like SOAP, up to its Newton-Schulz's round-off:
    in fp32 on CPU (ofe.core.muon) the mismatch measured 1e-5 of how far W moved (torch's bf16: 0.011), so
    the tolerance is 1e-3 of it (AdamW's mismatch here is about 0.1, the full movement)."""
    n = 6
    loss, w0 = least_squares(n)
    U, V = random_orthogonal(n, 1), random_orthogonal(n, 2)
    hp = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.01}
    w = run("muon", loss, w0, 12, **hp)
    wr = run("muon", lambda Wp, t: loss(U.T @ Wp @ V, t), U @ w0 @ V.T, 12, **hp)
    moved = (w - w0).abs().max()
    assert moved > 0.03
    assert (wr - U @ w @ V.T).abs().max() < 1e-3 * moved


def gpt(**model) -> GPT:
    """A tiny GPT with every kind of parameter: QK-norm gains, trainable residual gains, LN biases."""
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, d_model=16, n_head=2, context=8, vocab_size=32,
                           **{"qk_norm": "rms", "beta_trainable": True, **model}))


def gpt_loss(model: GPT, seed: int = 0) -> torch.Tensor:
    x = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(seed))
    return model(x, x.roll(-1, 1))[1]


HIDDEN = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight")


@pytest.mark.parametrize("model", [{}, {"norm": "none", "final_norm": "none", "beta_trainable": False,
                                        "qk_norm": "none"}])  # the second: OP-like, no norm module
def test_muon_split_puts_every_parameter_in_exactly_one_optimiser(model):
    m = gpt(**model)
    cfg = OptimConfig(name="muon", lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(m, cfg)
    names = {id(p): n for n, p in m.named_parameters()}
    seen = {part: [names[id(p)] for g in o.param_groups for p in g["params"]]
            for part, o in opt.parts.items()}
    everything = seen["muon"] + seen.get("adamw", [])
    assert sorted(everything) == sorted(names.values())  # each once (the tied head is wte)
    assert sorted(seen["muon"]) == sorted(f"blocks.{i}.{h}" for i in range(2) for h in HIDDEN)
    assert isinstance(opt.parts["muon"], torch.optim.Muon) and type(opt.parts["adamw"]) is torch.optim.AdamW
    # weight decay on matrices only (embeddings included), never on gains, biases or beta
    for o in opt.parts.values():
        for g in o.param_groups:
            assert {g["weight_decay"]} == {cfg.weight_decay if p.dim() == 2 else 0.0 for p in g["params"]}
    assert len(opt.param_groups) == sum(len(o.param_groups) for o in opt.parts.values())


def test_muon_rest_takes_adamws_steps():
    """Adam's first step is lr * m / sqrt(v) = lr * sign(g) (bias-corrected), after decoupled decay."""
    m = gpt()
    lr, wd = 1e-2, 0.1
    opt = build_optimizer(m, OptimConfig(name="muon", lr=lr, weight_decay=wd, eps=1e-12))
    gpt_loss(m).backward()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in m.named_parameters()}
    opt.step()
    adam = [n for n in before if not n.endswith(HIDDEN)]
    assert {"wte.weight", "wpe.weight", "blocks.0.beta", "blocks.0.attn.q_norm.weight",
            "blocks.0.norm1.bias", "final_norm.weight"} <= set(adam)
    for n, p in m.named_parameters():
        p0, g = before[n]
        if n in adam:
            decay = wd if p.dim() == 2 else 0.0
            torch.testing.assert_close(p.detach(), p0 * (1 - lr * decay) - lr * g.sign(), atol=1e-6, rtol=0)
        else:  # Muon's matrices: not a sign step (their update is orthogonalised, checked above)
            assert not torch.allclose(p.detach(), p0 * (1 - lr * wd) - lr * g.sign(), atol=1e-4)


def test_muon_takes_the_trainers_lr_in_both_halves():
    m = gpt()
    opt = build_optimizer(m, OptimConfig(name="muon", lr=1e-2))
    for lr, moves in ((0.0, False), (1e-3, True)):
        for group in opt.param_groups:  # as ofe.train.trainer sets the scheduled LR every step
            group["lr"] = lr
        before = [p.detach().clone() for p in m.parameters()]
        opt.zero_grad(set_to_none=True)
        gpt_loss(m).backward()
        opt.step()
        changed = [not torch.equal(p, q) for p, q in zip(m.parameters(), before)]
        assert all(changed) if moves else not any(changed)


def assert_same_state(a: object, b: object) -> None:
    """Equal nested state: the same keys, and tensors equal bit for bit."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b


def test_muon_state_round_trips_exactly():
    hp = OptimConfig(name="muon", lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    m = gpt()
    opt = build_optimizer(m, hp)

    def step(model, o, t):
        o.zero_grad(set_to_none=True)
        gpt_loss(model, t).backward()
        o.step()

    for t in range(3):
        step(m, opt, t)
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # as the trainer loads checkpoints
    clone = gpt()
    clone.load_state_dict(saved["model"])
    opt2 = build_optimizer(clone, hp)
    opt2.load_state_dict(saved["opt"])
    assert_same_state(opt.state_dict(), opt2.state_dict())
    for t in range(3, 6):
        step(m, opt, t)
        step(clone, opt2, t)
    for p, q in zip(m.parameters(), clone.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="holds"):  # another split's state is refused, not misread
        opt2.load_state_dict({"muon": saved["opt"]["muon"]})


def test_optimizer_names_agree_across_schema_config_and_code():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert schema["$defs"]["optimizer"]["enum"] == list(OPTIMIZERS)
    name_type = typing.get_type_hints(OptimConfig)["name"]
    assert list(typing.get_args(name_type)) == list(OPTIMIZERS)


def test_muon_trains_and_resumes_end_to_end(data_dir, tmp_path):
    cfg = tiny_run(data_dir, optim={"name": "muon"})
    summary = train(cfg, tmp_path / "straight")
    assert summary["status"] == "completed" and summary["skipped_steps"] == 0
    df = pd.read_parquet(tmp_path / "straight" / "metrics.parquet")
    loss = df[(df.site == "train") & (df.metric == "loss")].sort_values("step").value.to_numpy()
    assert len(loss) == 12 and all(math.isfinite(v) for v in loss)
    assert loss[-4:].mean() < loss[0] - 0.3, loss  # from ln 256 = 5.5; about 4.8 after 12 steps
    with pytest.raises(Killed):  # killed after the step-8 checkpoint, then restarted
        train(cfg, tmp_path / "resumed", on_checkpoint=[kill_after(8)])
    train(cfg, tmp_path / "resumed")
    pd.testing.assert_frame_equal(df, pd.read_parquet(tmp_path / "resumed" / "metrics.parquet"))


def test_rotated_adafactor_never_forms_the_gram_of_an_unrotated_side():
    """A 40 x 6 matrix with max_precond_dim 8: only its 6-wide side is rotated. No 40 x 40 tensor is
    ever made (the vocab x vocab Gram of an embedding), and the second step's update is the hand-built
    one: Q_R the eigenvectors of G1^T G1 (float64), Adafactor's factored moments of G2 Q_R, back-rotated."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ofe.core.factored import FactoredAdam

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.seen.add(tuple(out.shape))
            return out

    torch.manual_seed(0)
    w0 = torch.randn(40, 6)
    g1, g2 = torch.randn(40, 6), torch.randn(40, 6)
    p = torch.nn.Parameter(w0.clone())
    lr, (b1, b2), eps = 0.1, (0.9, 0.95), 1e-8
    opt = FactoredAdam([p], lr=lr, betas=(b1, b2), eps=eps, rotate=True, max_precond_dim=8)
    with Shapes() as spy:
        for g in (g1, g2):
            p.grad = g.clone()
            opt.step()
    assert (40, 40) not in spy.seen and (6, 6) in spy.seen
    assert set(opt.state[p]) >= {"R", "QR"} and "L" not in opt.state[p] and "QL" not in opt.state[p]

    # the expectation in float64: the first step builds Q_R only; the second updates in that basis
    _, q = torch.linalg.eigh(g1.double().T @ g1.double())
    gp = g2.double() @ q
    m = (1 - b1) * g2.double() @ q  # exp_avg after one lerp from zero, rotated
    sq = gp.square() + 1e-30
    row, col = (1 - b2) * sq.mean(1), (1 - b2) * sq.mean(0)
    v = torch.outer(row, col) / row.mean()
    update = (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
    want = w0.double() - lr * update @ q.T
    torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6)
