"""The two architectural parts of Outlier-Safe Pre-Training (OSP; Park et al., ACL 2025, arXiv 2506.19697).

Transcribed from the authors' code, github.com/dmis-lab/Outlier-Safe-Pre-Training,
`example_modeling_flax.py` (their README: "a simplified implementation of OSP, closely aligned with the
version used in our large-scale experiments"), and the Flax layers it builds on (flax/linen/normalization.py,
flax/linen/linear.py). docs/model.md, "OSP's recipe", lists what follows their code and what is adapted.

- `SingleScaleRMSNorm` (their SSNorm): `nn.RMSNorm(feature_axes=())`, an RMSNorm whose learnable scale
  has the shape of no feature axis, i.e. one scalar per norm: scale * x * rsqrt(mean(x^2) + 1e-6).
- `EmbedProj` (their EmbProj, `rot1` / `rot2`): `nn.DenseGeneral(dim, kernel_init=orthogonal())`, a
  square d -> d linear layer with an orthogonally initialised kernel and a zero-initialised bias, one after
  the embedding and one before the LM head.

`ofe.core.model` builds them for `model.norm` / `model.final_norm: single_scale` and `model.embed_proj`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SSNORM_EPS = 1e-6
"""flax.linen.RMSNorm's default epsilon, which OSP's `nn.RMSNorm(feature_axes=())` keeps."""


class SingleScaleRMSNorm(nn.Module):
    """OSP's SSNorm: x * rsqrt(mean(x^2) + eps) * g, with one learnable scalar g (initialised at 1).

    As Flax's RMSNorm: eps inside the square root, the mean of squares over the last axis in at least
    fp32, the scale initialised to ones. A per-channel gain can grow a few channels into outlier features
    (OSP's argument); one scalar scales every channel alike. g is stored as a 1-element vector rather
    than Flax's 0-D scalar: broadcasting gives the same function, and FSDP2 (`train.parallel: fsdp`)
    refuses 0-D parameters ("fully_shard doesn't support scalar parameters"). Being 1-D it is never
    weight-decayed (`ofe.core.optim.param_groups`) and takes AdamW under `muon`, as every norm gain.
    """

    def __init__(self, eps: float = SSNORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1))  # 'weight', as torch's norms name their gain

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()  # the mean of squares in fp32, as Flax's _compute_stats promotes it
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * y).to(x.dtype)


class EmbedProj(nn.Module):
    """OSP's EmbProj: y = x W^T + b, W (d x d) orthogonal at initialisation, b zero.

    Flax's DenseGeneral defaults to a bias (zero-initialised), and OSP's code does not turn it off, so
    it is kept here. W is torch's (out, in) layout, the transpose of Flax's (in, out) kernel; both are
    orthogonal, drawn the same way (QR of a Gaussian matrix with the signs of R's diagonal folded in).

    Not an `nn.Linear`, on purpose: the int8 protocols (`ofe.core.quant`) quantise every nn.Linear, and
    these two are not layers of the deployed model. OSP merges them into the embedding and the LM head
    after training, which the protocols keep in full precision; so the projections are left as the merged
    model would have them, and the tensors around them (the stream entering block 0, the final norm's
    output) are quantised as they are without them. Muon still takes W, as OSP asks: it is a 2-D
    parameter outside the embeddings (`ofe.core.optim.muon_param_groups`).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        nn.init.orthogonal_(self.weight)  # flax.linen.initializers.orthogonal(), scale 1

    def forward(self, x: Tensor) -> Tensor:
        # Under bf16 autocast the matmul runs in bf16, but the result goes back to the input's dtype: the
        # residual stream it starts (or the head's input) stays fp32, as it is without the projection.
        return F.linear(x, self.weight, self.bias).to(x.dtype)
