"""Every `model.attention` variant trains, goes through the static int8 protocol, splits between Muon and
AdamW as the other weights do, is a checked config field, and is a grid axis."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from ofe.config import ConfigError, ModelConfig, QuantConfig, RunConfig
from ofe.core.model import GPT
from ofe.core.optim import muon_param_groups
from ofe.core.quant import perplexity, quantised_copy
from ofe.plan import grid
from ofe.train.quantise import quantise_run
from ofe.train.trainer import train
from tests.helpers import REPO
from tests.helpers.runs import tiny_run

SMALL = dict(n_layer=2, d_model=32, n_head=2, context=16)
VARIANTS = ("softmax", "clipped_softmax", "gated_headwise", "gated_elementwise", "softmax1", "learned_sink",
            "softpick")


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", VARIANTS)
def test_every_variant_trains(kind):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL, attention=kind))
    sinks = model.blocks[0].attn.sinks.clone() if kind == "learned_sink" else None
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx, losses = _batch(), []
    for _ in range(6):  # one fixed batch: the loss must fall as the model memorises it
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    if kind == "learned_sink":  # trained, as the other weights
        assert not torch.equal(model.blocks[0].attn.sinks, sinks)


@pytest.mark.parametrize("kind", VARIANTS)
def test_the_static_protocol_quantises_every_variants_scores_and_probabilities(kind):
    """The static protocol switches every variant onto the explicit path and puts the scores, the
    variant's own weights (the `probs` tap) and, gated, the gate's linear layer on a grid of at most
    2^bits values; the quantised model still computes a finite perplexity."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL, attention=kind))
    idx, bits = _batch(1)[:, :16], 3
    q = quantised_copy(model, "static_per_tensor", bits, QuantConfig(), [idx])
    assert all(b.attn.explicit for b in q.blocks) and not any(b.attn.explicit for b in model.blocks)
    attn, seen = q.blocks[1].attn, {}
    taps = {"scores": attn.scores, "probs": attn.probs, **({"gate": attn.gate} if kind.startswith("gated") else {})}
    for name, module in taps.items():  # after the quantisation hook: the tensor as the next op sees it
        module.register_forward_hook(lambda _m, _a, out, name=name: seen.__setitem__(name, out.detach()))
    with torch.no_grad():
        q(idx)
    assert set(seen) == set(taps)
    for name, tensor in seen.items():
        assert tensor.unique().numel() <= 2**bits, name
    assert math.isfinite(perplexity(q, [(idx[:, :-1], idx[:, 1:])]))
    full = {}
    model.blocks[1].attn.explicit = True  # in full precision the same tap carries many values
    model.blocks[1].attn.probs.register_forward_hook(lambda _m, _a, out: full.__setitem__("probs", out))
    with torch.no_grad():
        model(idx)
    assert full["probs"].unique().numel() > 2**bits


@pytest.mark.parametrize("kind", ["gated_headwise", "learned_sink"])
def test_a_variant_runs_through_the_trainer_and_the_int8_evaluation(kind, data_dir, tmp_path):
    """The real pipeline, with the probe, checkpoints and the summary: one variant with a gate (fused
    kernel), one with a parameter of its own on the explicit path."""
    summary = train(tiny_run(data_dir, model={"attention": kind}, optim={"name": "muon"}), tmp_path)
    assert summary["status"] == "completed" and summary["config"]["model"]["attention"] == kind
    df = quantise_run(tmp_path, QuantConfig(protocols=("static_per_tensor",), calib_batches=1, eval_batches=1))
    assert df.ppl_q.notna().all() and (df.ppl_q < 1e4).all()


def test_only_the_gate_changes_the_initial_weights_a_seed_draws():
    """Variants without a matrix of their own start from the softmax model's weights at the same seed, so
    a seed compares the weight functions alone; the gate's matrix is drawn among the others."""
    def weights(kind: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        return GPT(ModelConfig(**SMALL, attention=kind)).state_dict()

    base = weights("softmax")
    for kind in ("clipped_softmax", "softmax1", "learned_sink", "softpick"):
        state = weights(kind)
        assert all(torch.equal(state[k], v) for k, v in base.items()), kind
    assert not torch.equal(weights("gated_headwise")["blocks.0.mlp.fc.weight"], base["blocks.0.mlp.fc.weight"])


def test_the_gate_goes_to_muon_and_the_sink_logits_to_adamw():
    for kind, name in [("gated_elementwise", "blocks.0.attn.gate.weight"), ("learned_sink", "blocks.0.attn.sinks")]:
        model = GPT(ModelConfig(**SMALL, attention=kind))
        param = dict(model.named_parameters())[name]
        group = next(g for g in muon_param_groups(model, 0.1) if any(p is param for p in g["params"]))
        assert group["muon"] == (param.dim() == 2)  # a matrix as qkv's; a vector as a norm gain, undecayed
        assert group["weight_decay"] == (0.1 if param.dim() == 2 else 0.0)


# ---- the config fields ------------------------------------------------------------------------------

@pytest.mark.parametrize("over, message", [
    ({"attention": "softmax2"}, r"^model\.attention: 'softmax2' is not allowed; choose one of \['softmax', "),
    ({"attention": "gated"}, r"^model\.attention: 'gated' is not allowed"),
    ({"clip_zeta": 0.9}, r"^model\.clip_zeta: must be >= 1, got 0\.9$"),
    ({"clip_gamma": 0.1}, r"^model\.clip_gamma: must be in \(-inf, 0\] or null, got 0\.1$"),
    ({"clip_gamma": "abc"}, r"^model\.clip_gamma: must be a number or null, got 'abc'$"),
])
def test_bad_attention_values_fail_by_name(over, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**over)


def test_the_default_attention_keeps_the_hash_and_every_other_value_changes_it():
    base = RunConfig().config_hash()
    assert RunConfig(model=ModelConfig(attention="softmax", clip_zeta=1, clip_gamma=None)).config_hash() == base
    assert ModelConfig(clip_zeta=1).clip_zeta == 1.0 and type(ModelConfig(clip_zeta=1).clip_zeta) is float
    hashes = {RunConfig(model=ModelConfig(attention=a)).config_hash() for a in VARIANTS}
    hashes |= {RunConfig(model=ModelConfig(attention="clipped_softmax", **o)).config_hash()
               for o in ({"clip_zeta": 1.1}, {"clip_gamma": -0.025})}
    assert len(hashes) == len(VARIANTS) + 2 and base in hashes


def test_the_attention_axis_plans_one_run_per_variant():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["studies"] = {"attention": {"grid": {"block": ["pre_ln", "op"], "model.attention": list(VARIANTS)}}}
    runs = grid.expand(config, REPO / "workflow" / "schemas" / "config.schema.yaml")
    assert len(runs) == 2 * len(VARIANTS)
    assert {r.config.model.attention for r in runs.values()} == set(VARIANTS)
    # softmax is the default: that run is the plain Pre-LN run every other study shares
    assert runs["tiny/pre_ln/beta1/adamw/lr0.01/seed0"].config.model.attention == "softmax"
    assert runs["tiny/op/beta0.2/adamw/lr0.01/seed0_model.attentionsoftpick"].config.model.attention == "softpick"
