"""Named presets: block variants (He et al. 2024, section 2) and model scales (section 4 and CPU calibration).

Each preset is a small function returning config overrides, so a new variant is a few lines here
and never a new code path in the model. Block presets take the model's depth, since OP's beta depends
on it (the others ignore it); `resolve` combines a scale with a block at that scale's depth.

What the paper's public code does, and these presets follow unless their docstring says otherwise:
its attention's query-key projection always has a trainable bias, whatever the block, so
`ModelConfig.qk_bias` defaults to True and every block preset keeps it; its norm-free blocks
(`norm_type: none`: OP and no-norm alike) keep one LayerNorm, on block 0's attention input; its HF
GPT-2 base always ends in a final LayerNorm; every matrix starts from N(0, 0.02^2).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from ofe.config import FSDP_REFUSED

Overrides = dict[str, dict[str, Any]]  # {"model": {...}, "train": {...}}

REFERENCE_DEPTH = 12
"""The public code's depth; its OP config's beta of 0.2 is the value for 12 layers."""


# ---- blocks: the norm ablations -----------------------------------------------------------------

def pre_ln(n_layer: int = REFERENCE_DEPTH) -> Overrides:
    """Pre-LN: x + f(LN(x)) for both branches, final LN before the unembedding; Q/K bias as in the
    public code (its `norm_type: ln`)."""
    return {"model": {"norm": "layernorm", "norm_position": "pre", "final_norm": "layernorm"}}


def post_ln(n_layer: int = REFERENCE_DEPTH) -> Overrides:
    """Post-LN: LN(x + f(x)); the last block's output is already normalised, so no final norm. Q/K bias
    as in the public code."""
    return {"model": {"norm": "layernorm", "norm_position": "post", "final_norm": "none"}}


def pre_rms(n_layer: int = REFERENCE_DEPTH) -> Overrides:
    """Pre-RMS: RMSNorm (with gain) instead of LayerNorm; Q/K bias as in the public code (its default
    block). The norm here is torch's nn.RMSNorm, not the public code's formula."""
    return {"model": {"norm": "rmsnorm", "norm_position": "pre", "final_norm": "rmsnorm"}}


def pre_srms(n_layer: int = REFERENCE_DEPTH) -> Overrides:
    """Pre-SRMS: RMSNorm without a trainable gain, showing the gains are not the cause. Q/K bias, as
    every attention of the public code has."""
    return {"model": {"norm": "srms", "norm_position": "pre", "final_norm": "srms"}}


def no_norm(n_layer: int = REFERENCE_DEPTH) -> Overrides:
    """Both block norms removed (the final LN stays); diverges at high LR without entropy regulation.
    As in the public code (`norm_type: none`, which does not look at the QK-norm), block 0 keeps a
    LayerNorm on its attention input; Q/K bias."""
    return {"model": {"norm": "none", "final_norm": "layernorm", "first_norm": "block0_attn_input"}}


def op_beta(n_layer: int) -> float:
    """OP's residual gain: the public code's 0.2 up to its 12 layers, 0.2 * sqrt(12 / n_layer) deeper
    (its op.yaml: "change for different depths: O(1/sqrt(depth))"). Shallower models keep 0.2: the
    calibrated CPU runs used it at 4 layers."""
    return 0.2 * math.sqrt(min(1.0, REFERENCE_DEPTH / n_layer))


def op(n_layer: int = REFERENCE_DEPTH) -> Overrides:
    """Outlier Protected block (He et al. 2024, section 2), as in the public code's OP config: no block
    norms, a LayerNorm on block 0's attention input only (the residual stream carries the raw embedding
    sum), trainable Q/K biases, QK-RMSNorm with a learnable gain in the public code's formula
    (gain * x / (rms(x) + 1e-5)), and both branches downweighted, x + beta f(x), with beta `op_beta`:
    0.2 up to 12 layers, 0.2 * sqrt(12 / n_layer) deeper (0.141 at the 24-layer scales).
    No final norm, as the paper describes OP; the public code keeps HF GPT-2's final LayerNorm, which
    is `op_final_norm`."""
    return {
        "model": {
            "norm": "none",
            "qk_norm": "rms",
            "qk_bias": True,
            "beta": op_beta(n_layer),
            "final_norm": "none",
            "first_norm": "block0_attn_input",
        }
    }


def op_final_norm(n_layer: int = REFERENCE_DEPTH) -> Overrides:
    """OP with a final LayerNorm added back: raises kurtosis in late layers (He et al. 2024, section 2).
    This is the public code's OP model exactly (its GPT-2 base keeps the final LN); tests/unit/core/test_reference.py
    checks its forward pass against a transcription of that code."""
    out = op(n_layer)
    out["model"]["final_norm"] = "layernorm"
    return out


def pre_ssnorm(n_layer: int = REFERENCE_DEPTH) -> Overrides:
    """Pre-RMS with Outlier-Safe Pre-Training's single-scale RMSNorm (SSNorm, arXiv 2506.19697): one
    scalar gain per norm, block and final norms alike (ofe.core.osp.SingleScaleRMSNorm). Q/K bias, as
    every block here; OSP's Llama has none, and learned positions where it has RoPE."""
    return {"model": {"norm": "single_scale", "norm_position": "pre", "final_norm": "single_scale"}}


def osp(n_layer: int = REFERENCE_DEPTH) -> Overrides:
    """OSP's architecture: `pre_ssnorm` plus the embedding projection (EmbProj: orthogonally initialised
    d x d maps after the embeddings and before the tied head, ofe.core.osp.EmbedProj). OSP's recipe
    trains it with Muon (optimizer: muon), which is an axis of its own: configs/osp.yaml."""
    out = pre_ssnorm(n_layer)
    out["model"]["embed_proj"] = True
    return out


BLOCKS: dict[str, Callable[..., Overrides]] = {
    f.__name__: f for f in (pre_ln, post_ln, pre_rms, pre_srms, no_norm, op, op_final_norm, pre_ssnorm, osp)
}
# Blocks of the extensions beyond the paper that only their own, opt-in study configs use (configs/osp.yaml),
# so the default grid (config.yaml) keeps its time budget; it runs every other block.
OPT_IN_BLOCKS = frozenset({"pre_ssnorm", "osp"})


# ---- scales -------------------------------------------------------------------------------------

def tiny() -> Overrides:
    """The CPU default (docs/cpu-calibration.md): outliers appear within 100-300 steps at LR 1e-2."""
    return {"model": {"n_layer": 4, "d_model": 128, "n_head": 4, "context": 128},
            "train": {"batch_size": 16}}


def small() -> Overrides:
    """CPU, about 5M parameters: a slower but less noisy first look."""
    return {"model": {"n_layer": 6, "d_model": 256, "n_head": 4, "context": 128},
            "train": {"batch_size": 16}}


def m130() -> Overrides:
    """The paper's CodeParrot model (He et al. 2024, section 4): 12 layers, d 768, 12 heads, context
    128, 128 sequences per step; the public code's depth, so OP's beta is its 0.2."""
    return {"model": {"n_layer": 12, "d_model": 768, "n_head": 12, "context": 128},
            "train": {"batch_size": 128}}


def m350() -> Overrides:
    """GPU: the paper's 320M Languini scale, context 512; 24 layers, so OP's beta is 0.2 * sqrt(1/2)."""
    return {"model": {"n_layer": 24, "d_model": 1024, "n_head": 16, "context": 512},
            "train": {"batch_size": 64}}


# The paper-scale presets train sharded: FSDP over the job's processes (launcher.yaml gives them 8 GPUs
# each). This is the one place that decides it, so the launcher, the memory plan (ofe.plan.memory) and the
# trainer read the same value; `resolve` falls back to ddp, with the train settings below, for the
# optimisers FSDP cannot shard.
SHARDED = {"parallel": "fsdp"}
DDP_FALLBACK: dict[str, dict[str, Any]] = {
    # SOAP's statistics and eigenbases take 47 GB per GPU at 1.2B; with a process's whole 8 sequences
    # the plan comes to 79.4 GB per GPU under ddp (vocabulary 16384), with micro-batches of 4 to 76.3 GB
    "1.2b": {"micro_batch_size": 4},
}


# Checkpoint intervals of the paper-scale presets: a checkpoint blocks training while it is written,
# so each interval is long enough that writing costs under 5% of the training time, by these stated
# assumptions (tests/unit/plan/test_costs.py recomputes them):
# - a step's time from its FLOPs, 6 N D (N parameters, D = 64 x 512 tokens), on 8 H100s at 989 TFLOP/s
#   of dense bf16 each and 50% MFU: an optimistic MFU for 4,096 tokens per GPU, so steps are if anything
#   longer and the share smaller (attention's FLOPs, +4% at context 512, are left out for the same reason);
# - a checkpoint's bytes by `ofe.plan.costs.checkpoint_bytes` (fp32 weights + optimiser state, vocabulary
#   16384 as Languini's), of the largest-state optimiser the scale runs (SOAP), at 1 GB/s of writing,
#   a parallel filesystem from one node.
# A config's train.checkpoint_every wins over these (config.yaml's defaults set 100 for the CPU grid:
# leave it out of a paper-scale config, or set the interval the cluster's storage needs).


def b1_2() -> Overrides:
    """GPU: the paper's 1.2B Languini scale, context 512; 24 layers, so OP's beta is 0.2 * sqrt(1/2).
    Sharded (FSDP): on 8 x 80 GB GPUs each process needs about 15 GB with its whole share of the batch
    (the plan of `python -m ofe check-config`); the optimisers FSDP cannot shard run under ddp with
    micro-batches of 4 sequences (`DDP_FALLBACK`).
    Checkpoints every 20,000 steps (by the assumptions above this function): 1.24B parameters, a step
    of 2.44e14 FLOPs takes 0.062 s, so 20,000 steps take 1,235 s (21 minutes); SOAP's checkpoint is
    52.0 GB, 52 s at 1 GB/s: 4.2% (AdamW's 14.9 GB: 1.2%)."""
    return {"model": {"n_layer": 24, "d_model": 2048, "n_head": 16, "context": 512},
            "train": {"batch_size": 64, "checkpoint_every": 20000, **SHARDED}}


def b7() -> Overrides:
    """GPU: the paper's largest scale (He et al. 2024, "Understanding and Minimising Outlier Features in
    Transformer Training", arXiv 2405.19279: 7B parameters, 6B tokens of Languini Books, vocabulary 16384,
    context 512, as its 1.2B). The shape is the standard one at 7B (GPT-3 6.7B's and OPT-6.7B's):
    32 layers, d 4096, 32 heads of 128, a 4d MLP: 6.44B parameters in the blocks, 6.51B with a
    16384-token vocabulary. 32 layers, so OP's beta is 0.2 * sqrt(12/32) = 0.122. Batch 64 x 512
    tokens, as the 1.2B preset. Sharded (FSDP): on 8 x 80 GB GPUs each process holds an eighth of the
    weights, gradients and AdamW state and runs its 8 sequences at once (about 52 GB in the plan of
    `python -m ofe check-config`). No micro-batches by default: under FSDP each one gathers every
    block's weights again, so they cost communication and are worth it only where memory is short
    (`train.micro_batch_size`).
    Checkpoints every 7,000 steps (by the assumptions above `b1_2`): a step of 1.28e15 FLOPs takes
    0.324 s, so 7,000 steps take 2,266 s (38 minutes); AdamW's checkpoint is 78.1 GB, 78 s at 1 GB/s:
    3.4% (SOAP's 99.9 GB, were it to fit: 4.4%)."""
    return {"model": {"n_layer": 32, "d_model": 4096, "n_head": 32, "context": 512},
            "train": {"batch_size": 64, "checkpoint_every": 7000, **SHARDED}}


SCALES: dict[str, Callable[[], Overrides]] = {
    "tiny": tiny, "small": small, "130m": m130, "350m": m350, "1.2b": b1_2, "7b": b7,
}


def resolve(scale: str, block: str, n_layer: int | None = None, optimizer: str | None = None) -> Overrides:
    """The scale preset's overrides with the block preset's on top, the block built for the model's
    depth: `n_layer`, or the scale's own if None (pass it where a config overrides the scale's depth).

    A sharded scale with an `optimizer` that needs whole matrices (ofe.config.FSDP_REFUSED: adafactor,
    soap, rotated_adafactor, muon) gets ddp instead, with the scale's `DDP_FALLBACK` settings: the
    scale's fsdp is a preference, and the memory plan then says whether that run fits. config.yaml's
    `train` settings still win (and fsdp with such an optimiser is refused there, by name)."""
    out = {section: dict(values) for section, values in SCALES[scale]().items()}
    depth = out["model"]["n_layer"] if n_layer is None else n_layer
    for section, values in BLOCKS[block](depth).items():
        out.setdefault(section, {}).update(values)
    if out.get("train", {}).get("parallel") == "fsdp" and optimizer in FSDP_REFUSED:
        out["train"].update(parallel="ddp", **DDP_FALLBACK.get(scale, {}))
    return out
