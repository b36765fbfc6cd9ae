"""Named presets: block variants (PAPER.md section 2) and model scales (sections 4 and CPU calibration).

Each preset is a small function returning config overrides, so a new variant is a few lines here
and never a new code path in the model.
"""

from __future__ import annotations

from typing import Any, Callable

Overrides = dict[str, dict[str, Any]]  # {"model": {...}, "train": {...}}


# ---- blocks: the norm ablations -----------------------------------------------------------------

def pre_ln() -> Overrides:
    """Pre-LN: x + f(LN(x)) for both branches, final LN before the unembedding."""
    return {"model": {"norm": "layernorm", "norm_position": "pre", "final_norm": "layernorm"}}


def post_ln() -> Overrides:
    """Post-LN: LN(x + f(x)); the last block's output is already normalised, so no final norm."""
    return {"model": {"norm": "layernorm", "norm_position": "post", "final_norm": "none"}}


def pre_rms() -> Overrides:
    """Pre-RMS: RMSNorm (with gain) instead of LayerNorm."""
    return {"model": {"norm": "rmsnorm", "norm_position": "pre", "final_norm": "rmsnorm"}}


def pre_srms() -> Overrides:
    """Pre-SRMS: RMSNorm without a trainable gain, showing the gains are not the cause."""
    return {"model": {"norm": "srms", "norm_position": "pre", "final_norm": "srms"}}


def no_norm() -> Overrides:
    """Both block norms removed (the final LN stays); diverges at high LR without entropy regulation."""
    return {"model": {"norm": "none", "final_norm": "layernorm"}}


def op() -> Overrides:
    """Outlier Protected block (PAPER.md section 2): no pre-norms, QK-RMSNorm with a learnable gain,
    downweighted branches x + beta f(x) with beta 0.2 (the paper's 12-layer value; the calibrated CPU
    runs used it at 4 layers too), no final norm, a LayerNorm on the embeddings as in the public code."""
    return {
        "model": {
            "norm": "none",
            "qk_norm": "rms",
            "beta": 0.2,
            "final_norm": "none",
            "embed_norm": "layernorm",
        }
    }


def op_final_norm() -> Overrides:
    """OP with a final LayerNorm added back: raises kurtosis in late layers (PAPER.md section 2)."""
    out = op()
    out["model"]["final_norm"] = "layernorm"
    return out


BLOCKS: dict[str, Callable[[], Overrides]] = {
    f.__name__: f for f in (pre_ln, post_ln, pre_rms, pre_srms, no_norm, op, op_final_norm)
}


# ---- scales -------------------------------------------------------------------------------------

def tiny() -> Overrides:
    """The CPU default (CPU-CALIBRATION.md): outliers appear within 100-300 steps at LR 1e-2."""
    return {"model": {"n_layer": 4, "d_model": 128, "n_head": 4, "context": 128},
            "train": {"batch_size": 16}}


def small() -> Overrides:
    """CPU, about 5M parameters: a slower but less noisy first look."""
    return {"model": {"n_layer": 6, "d_model": 256, "n_head": 4, "context": 128},
            "train": {"batch_size": 16}}


def m130() -> Overrides:
    """The paper's CodeParrot model (PAPER.md section 4): 12 layers, d 768, 12 heads, context 128,
    128 sequences per step."""
    return {"model": {"n_layer": 12, "d_model": 768, "n_head": 12, "context": 128},
            "train": {"batch_size": 128}}


def m350() -> Overrides:
    """GPU: the paper's 320M Languini scale, context 512."""
    return {"model": {"n_layer": 24, "d_model": 1024, "n_head": 16, "context": 512},
            "train": {"batch_size": 64}}


def b1_2() -> Overrides:
    """GPU: the paper's 1.2B Languini scale, context 512."""
    return {"model": {"n_layer": 24, "d_model": 2048, "n_head": 16, "context": 512},
            "train": {"batch_size": 64}}


SCALES: dict[str, Callable[[], Overrides]] = {
    "tiny": tiny, "small": small, "130m": m130, "350m": m350, "1.2b": b1_2,
}
