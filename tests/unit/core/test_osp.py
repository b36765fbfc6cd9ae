"""Outlier-Safe Pre-Training's parts (Park et al. 2025, arXiv 2506.19697) against transcriptions of the authors' code.

The references here are written from github.com/dmis-lab/Outlier-Safe-Pre-Training, `example_modeling_flax.py`
(`Llama` with `rmsnorm_scale="single"` and `rotated_embed=True`), and from the Flax layers it calls:
`flax/linen/normalization.py` (github.com/google/flax: `RMSNorm.__call__` -> `_compute_stats(use_mean=False)`
-> `_normalize`) and `flax/linen/linear.py` (`DenseGeneral`: x @ kernel + bias, kernel (in, out), bias zeros,
`use_bias=True` by default). They compute in float64 and keep Flax's layout (kernel = our weight transposed),
so a wrong transpose, a missing bias or eps outside the root breaks the comparison.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from ofe.config import ConfigError, ModelConfig, OptimConfig, QuantConfig, RunConfig
from ofe.core.model import GPT
from ofe.core.optim import OPTIMIZERS, build_optimizer
from ofe.core.osp import SSNORM_EPS, EmbedProj, SingleScaleRMSNorm
from ofe.core.quant import _static_sites, perplexity, quantised_copy
from ofe.plan import presets

FLAX_RMSNORM_EPS = 1e-6  # flax.linen.RMSNorm.epsilon's default; OSP's nn.RMSNorm(feature_axes=()) keeps it
SMALL = {"n_layer": 2, "d_model": 32, "n_head": 2, "context": 16}


# ---- the transcriptions ------------------------------------------------------------------------------

def flax_rmsnorm(x: Tensor, scale: Tensor, eps: float = FLAX_RMSNORM_EPS) -> Tensor:
    """flax.linen.RMSNorm over the last axis, reduction_axes=-1. `scale` has the feature_axes' shape:
    () for OSP's single scale (feature_axes=()), (d,) for Flax's default (feature_axes=-1)."""
    x = x.double()
    var = (x * x).mean(dim=-1)  # _compute_stats, use_mean=False: mean of |x|^2; the mean itself is 0
    mul = torch.rsqrt(var.unsqueeze(-1) + eps)  # _normalize: mul = rsqrt(var + epsilon), expand_dims
    feature_shape = [1] * x.dim() if scale.dim() == 0 else [1] * (x.dim() - 1) + [x.shape[-1]]
    mul = mul * scale.double().reshape(feature_shape)  # mul *= scale.reshape(feature_shape)
    return (x - 0.0) * mul  # y = x - mean; y *= mul


def dense_general(x: Tensor, kernel: Tensor, bias: Tensor) -> Tensor:
    """flax.linen.DenseGeneral(features, axis=-1): dot_general over x's last axis and kernel's first, + bias."""
    return x.double() @ kernel.double() + bias.double()


def osp_logits(model: GPT, idx: Tensor) -> Tensor:
    """`Llama.__call__` of example_modeling_flax.py with rmsnorm_scale 'single' and rotated_embed, on our
    GPT's embeddings, branches and tied head (the parts OSP does not change): x = rot1(wte(tokens));
    per layer x += attn(norm1(x)), x += ffn(norm2(x)); logits = head(rot2(norm(x))). Ours also has learned
    positions (OSP: RoPE), so rot1 takes the token + position sum; the head is tied to wte."""
    p = {n: t.detach() for n, t in model.named_parameters()}
    kernel1, kernel2 = p["embed_proj_in.weight"].T, p["embed_proj_out.weight"].T  # Flax's (in, out)
    pos = torch.arange(idx.shape[1])
    x = dense_general(p["wte.weight"][idx] + p["wpe.weight"][pos], kernel1, p["embed_proj_in.bias"])
    for i, block in enumerate(model.blocks):
        g1, g2 = p[f"blocks.{i}.norm1.weight"].reshape(()), p[f"blocks.{i}.norm2.weight"].reshape(())
        x = x + block.attn(flax_rmsnorm(x, g1).float()).double()
        x = x + block.mlp(flax_rmsnorm(x, g2).float()).double()
    h = flax_rmsnorm(x, p["final_norm.weight"].reshape(()))
    return dense_general(h, kernel2, p["embed_proj_out.bias"]) @ p["wte.weight"].double().T


def osp_model(**over) -> GPT:
    return GPT(ModelConfig(**{**SMALL, **presets.osp()["model"], **over}))


def perturb(model: GPT, seed: int = 1) -> None:
    """Move every gain, bias and projection off its initial value, so that each one matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 or name.startswith("embed_proj"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


# ---- single-scale RMSNorm ---------------------------------------------------------------------------

def test_the_flax_transcription_with_per_channel_scales_is_torchs_rmsnorm():
    """The reference is right where a second implementation exists: with Flax's default feature_axes=-1
    (a gain per channel) it is torch's nn.RMSNorm at Flax's eps."""
    torch.manual_seed(0)
    x, norm = torch.randn(3, 5, 16), nn.RMSNorm(16, eps=FLAX_RMSNORM_EPS)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    torch.testing.assert_close(norm(x).double(), flax_rmsnorm(x, norm.weight.detach()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1e-2, 1e-4])  # small rms: where eps's placement matters
def test_single_scale_rmsnorm_equals_osps_ssnorm(scale):
    torch.manual_seed(0)
    norm = SingleScaleRMSNorm()
    assert norm.eps == SSNORM_EPS == FLAX_RMSNORM_EPS
    assert norm.weight.numel() == 1 and norm.weight.item() == 1.0  # one scalar, initialised at one
    with torch.no_grad():
        norm.weight.fill_(0.37)
    x = scale * torch.randn(4, 7, 24)
    out = norm(x)
    torch.testing.assert_close(out.double(), flax_rmsnorm(x, torch.tensor(0.37)), rtol=1e-5, atol=1e-7)
    # eps outside the root (the public code's RefRMSNorm formula) is another function at small rms
    outside = 0.37 * x.double() / (x.double().pow(2).mean(-1, keepdim=True).sqrt() + SSNORM_EPS)
    assert torch.allclose(out.double(), outside, rtol=1e-3) == (scale == 1.0)  # eps / rms^2: 1e-6, 1e-2, 100
    # one gain for every channel: per token the output is a multiple of the input
    ratio = out / x
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio))


def test_single_scale_is_a_norm_kind_and_config_values_are_checked():
    model = GPT(ModelConfig(**SMALL, norm="single_scale", final_norm="single_scale"))
    norms = [model.final_norm] + [n for b in model.blocks for n in (b.norm1, b.norm2)]
    assert all(isinstance(n, SingleScaleRMSNorm) for n in norms)
    with pytest.raises(ConfigError, match="model.norm"):
        RunConfig.from_dict({"model": {"norm": "single"}})
    with pytest.raises(ConfigError, match="model.embed_proj"):
        RunConfig.from_dict({"model": {"embed_proj": "yes"}})


# ---- the embedding projection ------------------------------------------------------------------------

def test_embedding_projections_are_orthogonal_with_zero_bias_at_initialisation():
    torch.manual_seed(0)
    model = osp_model(d_model=64, n_head=4)
    eye = torch.eye(64)
    for proj in (model.embed_proj_in, model.embed_proj_out):
        w = proj.weight.detach()
        torch.testing.assert_close(w @ w.T, eye, rtol=0, atol=1e-5)
        torch.testing.assert_close(w.T @ w, eye, rtol=0, atol=1e-5)
        assert not torch.equal(w, eye) and torch.count_nonzero(proj.bias) == 0
    assert not torch.equal(model.embed_proj_in.weight, model.embed_proj_out.weight)  # two draws
    assert isinstance(model.embed_proj_in, EmbedProj) and not isinstance(model.embed_proj_in, nn.Linear)
    assert GPT(ModelConfig(**SMALL)).embed_proj_in is None  # off by default


def test_forward_equals_the_transcription_of_osps_forward():
    torch.manual_seed(0)
    model = osp_model()
    idx = torch.randint(0, 256, (2, SMALL["context"]))
    for perturbed in (False, True):  # at initialisation, and with every gain, bias and projection moved
        if perturbed:
            perturb(model)
        logits, _ = model(idx)
        torch.testing.assert_close(logits.double(), osp_logits(model, idx), rtol=1e-5, atol=1e-5)


def test_the_comparison_fails_for_a_transposed_projection():
    """The check is meaningful: torch's (out, in) weight used as Flax's kernel (x @ W, not x @ W^T) misses."""
    torch.manual_seed(0)
    model = osp_model()
    perturb(model)
    idx = torch.randint(0, 256, (2, SMALL["context"]))
    want = osp_logits(model, idx)
    with torch.no_grad():
        model.embed_proj_out.weight.copy_(model.embed_proj_out.weight.T.clone())
    assert not torch.allclose(model(idx)[0].double(), want, rtol=1e-3, atol=1e-3)


# ---- every optimiser, the split, the steps -----------------------------------------------------------

def _step(model: GPT, opt, idx: Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss = model(idx, idx)[1]
    loss.backward()
    opt.step()
    return loss.item()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimiser_trains_single_scale_norms_and_projections(name):
    torch.manual_seed(0)
    model = osp_model()
    opt = build_optimizer(model, OptimConfig(name=name, lr=3e-3, weight_decay=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, 256, (4, SMALL["context"]))
    losses = [_step(model, opt, idx) for _ in range(4)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        if n.endswith("norm1.weight") or n.endswith("norm2.weight") or n.startswith(("final_norm", "embed_proj")):
            assert not torch.equal(p, before[n]), f"{name} left {n} unchanged"


@pytest.mark.parametrize("name", ["adamw", "adafactor", "rotated_adafactor", "muon"])
def test_the_scalar_gain_takes_adams_first_step_undecayed(name):
    """Adam's first step is -lr g / (|g| + eps) per entry, whatever the entry's size: a one-element gain
    is an ordinary vector to every optimiser (SOAP's first step makes no update: the test above), and no
    weight decay reaches it."""
    torch.manual_seed(0)
    lr, eps = 3e-3, 1e-8
    model = osp_model()
    opt = build_optimizer(model, OptimConfig(name=name, lr=lr, eps=eps, weight_decay=0.5))
    gains = {n: p for n, p in model.named_parameters() if p.numel() == 1}
    assert len(gains) == 2 * SMALL["n_layer"] + 1  # two per block and the final norm
    before = {n: p.detach().clone() for n, p in gains.items()}
    idx = torch.randint(0, 256, (4, SMALL["context"]))
    opt.zero_grad(set_to_none=True)
    model(idx, idx)[1].backward()
    grads = {n: p.grad.clone() for n, p in gains.items()}
    opt.step()
    for n, p in gains.items():
        g = grads[n]
        torch.testing.assert_close(p.detach() - before[n], -lr * g / (g.abs() + eps), rtol=1e-5, atol=1e-9)


def test_muon_takes_the_projections_and_adamw_the_gains_and_biases():
    """OSP's README: the projections are optimised by Muon, not by the embeddings' AdamW."""
    model = osp_model()
    opt = build_optimizer(model, OptimConfig(name="muon"))
    muon = {id(p) for g in opt.parts["muon"].param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.parts["adamw"].param_groups for p in g["params"]}
    for proj in (model.embed_proj_in, model.embed_proj_out):
        assert id(proj.weight) in muon and id(proj.bias) in adamw
    assert id(model.final_norm.weight) in adamw and id(model.wte.weight) in adamw


# ---- int8 protocols ----------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["static_per_tensor", "dynamic_per_token"])
def test_int8_protocols_run_and_leave_the_projections_as_the_merged_model_has_them(protocol):
    """OSP merges the projections into the embedding and the head after training; both stay in full
    precision under our protocols, so the projections do too: no weight of theirs is rounded and no
    quantiser sits on their inputs or outputs (the stream entering block 0 and the final norm's output
    are quantised, as without them)."""
    torch.manual_seed(0)
    model = osp_model()
    perturb(model)
    idx = torch.randint(0, 256, (2, SMALL["context"]))
    batches = [(idx, idx)]
    q = quantised_copy(model, protocol, 8, QuantConfig(), [idx])
    for name in ("embed_proj_in", "embed_proj_out"):
        assert torch.equal(getattr(q, name).weight, getattr(model, name).weight)
        assert not getattr(q, name)._forward_hooks and not getattr(q, name)._forward_pre_hooks
    assert math.isfinite(perplexity(q, batches))
    assert not torch.equal(q(idx)[0], model(idx)[0])  # the rest is quantised
    if protocol == "static_per_tensor":
        sites = _static_sites(osp_model())
        # single-scale norms are norms: their outputs are quantised as every LayerNorm's and RMSNorm's
        assert {"blocks.0.input:out", "blocks.0.norm1:out", "final_norm:out"} <= set(sites)
        assert not any("embed_proj" in s for s in sites)


def test_a_trained_osp_run_is_quantised_under_both_protocols(data_dir, tmp_path):
    """End to end: the OSP recipe (Muon, single-scale norms, projections) trains, checkpoints, reloads and
    is evaluated by `quantise_run` under both protocols."""
    from ofe.train.quantise import quantise_run
    from ofe.train.trainer import train
    from tests.helpers.runs import tiny_run

    cfg = tiny_run(data_dir, model=presets.osp()["model"], optim={"name": "muon"}, train={"steps": 8})
    assert train(cfg, tmp_path)["status"] == "completed"
    df = quantise_run(tmp_path, QuantConfig(bits=(8,), calib_batches=1, eval_batches=1))
    assert set(df.protocol) == {"static_per_tensor", "dynamic_per_token"}
    assert df.ppl_q.map(math.isfinite).all() and (df.ppl_q > 1).all()


def test_the_osp_recipe_trains_sharded(data_dir, tmp_path):
    """FSDP2 refuses 0-D parameters, hence the single-scale gain's one-element vector: the osp block trains
    under train.parallel fsdp (one process, a one-member group, as tests/unit/train/test_dcp.py)."""
    from ofe.train.trainer import train
    from tests.helpers.runs import tiny_run

    cfg = tiny_run(data_dir, model=presets.osp()["model"], train={"parallel": "fsdp", "steps": 8})
    assert train(cfg, tmp_path)["status"] == "completed"
