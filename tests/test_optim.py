"""Optimisers against independent properties (PAPER.md section 3): SOAP is rotation-equivariant and
reduces to Adam on diagonal gradients; AdamW is not equivariant; state round-trips exactly."""

from __future__ import annotations

import io

import pytest
import torch

from ofe.optim import OPTIMIZERS, make_optimizer

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
