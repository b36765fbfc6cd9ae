"""Typed, validated configuration of one run: model, optimiser, training, data (the int8 evaluation's
section, `QuantConfig`, is `ofe.config.quant`).

Frozen dataclasses with docstrings; every ablation is a field. `RunConfig.from_dict` rejects unknown
keys and bad values with a message naming the field and the allowed values, so a typo fails before
any job starts. JSON in and out (`to_dict` / `from_dict`) is what travels between workflow steps.

Each field is checked in __post_init__ against its type hint, range and choices (`ofe.config.fields`): a wrong
value fails here, by name, not as a TypeError deep inside training.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

from ofe.config.fields import SECTIONS, ConfigError, check_fields, field_checkers

# srms: RMSNorm without a gain; single_scale: RMSNorm with one scalar gain (OSP's SSNorm, ofe.core.osp)
NormKind = Literal["layernorm", "rmsnorm", "srms", "single_scale", "none"]
# How attention turns its logits into weights (`ModelConfig.attention`; ofe.core.attention). The gate's two
# forms are two values rather than a second field: one axis then sweeps every variant, and no field is read
# by some values only (a gate kind on a softmax model would change its hash and nothing else).
AttentionKind = Literal["softmax", "clipped_softmax", "gated_headwise", "gated_elementwise", "softmax1",
                        "learned_sink", "softpick"]


@dataclass(frozen=True)
class ModelConfig:
    """A GPT-style causal decoder (He et al. 2024, section 2); every block variant is a field here."""

    vocab_size: int = 256
    context: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    norm: NormKind = "layernorm"
    """Norm inside the blocks ('none' for OP and no-norm blocks)."""
    norm_position: Literal["pre", "post"] = "pre"
    """pre: x + f(norm(x)); post: norm(x + f(x)) (Post-LN)."""
    qk_norm: Literal["none", "rms", "rms_torch"] = "none"
    """RMSNorm of queries and keys over the head dimension, with a learnable gain (entropy regulation).
    'rms': He et al. 2024's public code, gain * x / (rms(x) + 1e-5) (eps outside the root);
    'rms_torch': torch's nn.RMSNorm, x * rsqrt(mean(x^2) + eps)."""
    qk_bias: bool = True
    """Trainable (zero-initialised) biases on the query and key projections, as in the public code,
    whose attention always has them; the value and output projections have none."""
    logit_cap: float | None = None
    """tanh soft-cap of attention logits (30 in He et al. 2024, section 2), the alternative to QK-norm."""
    attention: AttentionKind = "softmax"
    """How attention weights are formed (docs/science.md section 2, "Attention variants"). 'softmax':
    torch's fused SDPA kernel. 'clipped_softmax': clip((zeta - gamma) softmax + gamma, 0, 1) (Bondarenko
    et al. 2023). 'gated_headwise' / 'gated_elementwise': softmax attention times a sigmoid gate computed
    from the attention input, one scalar per head or one per channel, before the output projection
    (Qiu et al. 2025, position G1). 'softmax1': exp(x_i) / (1 + sum_j exp(x_j)) (E. Miller 2023).
    'learned_sink': a trainable per-head logit in the softmax's denominator (gpt-oss). 'softpick':
    relu(exp(x_i) - 1) / sum_j |exp(x_j) - 1| (Zuhri et al. 2025)."""
    clip_zeta: float = 1.0
    """clipped_softmax's upper stretch zeta (>= 1); 1, the authors' causal-LM setting, stretches only
    downwards. Read by clipped_softmax only."""
    clip_gamma: float | None = None
    """clipped_softmax's lower stretch gamma (<= 0); null: -12 / context, the authors' causal-LM setting
    (gamma = -alpha / T, alpha = 12, T the training sequence length). Read by clipped_softmax only."""
    beta: float = 1.0
    """Residual branch gain: x + beta * f(x). OP uses 0.2 at 12 layers, O(1/sqrt(depth))."""
    beta_trainable: bool = False
    """Make beta a trainable scalar per branch (initialised at `beta`)."""
    final_norm: NormKind = "layernorm"
    """Norm before the unembedding ('none': the paper's OP)."""
    embed_proj: bool = False
    """Outlier-Safe Pre-Training's embedding projection (EmbProj, arXiv 2506.19697): a d x d linear layer,
    orthogonally initialised, with a zero-initialised bias, after the embeddings (on the token + position
    sum) and another before the tied head (ofe.core.osp.EmbedProj)."""
    first_norm: Literal["none", "embed_stream", "block0_attn_input"] = "none"
    """An extra LayerNorm at the model's input. 'block0_attn_input': on block 0's attention-branch input
    only, so the residual stream keeps the raw embedding sum (the public code's norm-free blocks:
    "always use LN in first layer"); needs norm 'none'. 'embed_stream': on the embedding sum itself,
    inside the residual stream."""
    init_std: float = 0.02
    embed_init_std: float = 0.02
    scale_residual_init: bool = False
    """GPT-2's 1/sqrt(2 n_layer) scaling of the output projections' init. Off: the public code draws
    every block matrix from N(0, init_std^2)."""
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        check_fields(self, "model")
        if self.d_model % self.n_head:
            raise ConfigError(f"model.d_model: {self.d_model} is not divisible by n_head={self.n_head}")
        if self.first_norm == "block0_attn_input" and self.norm != "none":
            # a normed block already normalises its attention input; a second LN there means nothing
            raise ConfigError(f"model.first_norm: 'block0_attn_input' needs model.norm 'none', got "
                              f"{self.norm!r}; use 'none' or 'embed_stream'")

    @property
    def n_params_approx(self) -> int:
        d, L = self.d_model, self.n_layer
        return self.vocab_size * d + self.context * d + L * (4 + 2 * self.mlp_ratio) * d * d


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and LR schedule (docs/science.md section 3 for the public code's defaults)."""

    name: Literal["adamw", "adafactor", "soap", "rotated_adafactor", "muon"] = "adamw"
    """adamw (diagonal), soap (Adam in Shampoo's eigenbasis), adafactor (factored second moment),
    rotated_adafactor (the same in Shampoo's eigenbasis) and muon (orthogonalised momentum for the
    blocks' matrices, AdamW for embeddings and vectors, one shared LR); see ofe.core.optim.make_optimizer."""
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Applied to matrices only: never to norm gains, biases or residual gains."""
    warmup_frac: float = 0.05
    decay: Literal["cosine", "linear", "constant"] = "linear"
    min_lr_frac: float = 0.0
    """The LR at the end of the decay, as a fraction of the peak."""
    clip: float | None = 1.0
    precondition_frequency: int = 10
    """soap / rotated_adafactor: steps between eigenbasis refreshes (the SOAP reference's 10)."""
    max_precond_dim: int = 10000
    """soap / rotated_adafactor: dimensions larger than this are not rotated (e.g. a big vocabulary)."""
    shampoo_beta: float | None = None
    """EMA rate of the G G^T and G^T G statistics; None uses betas[1]."""

    def __post_init__(self) -> None:
        check_fields(self, "optim")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop: length, batch, cadences and determinism."""

    steps: int = 400
    batch_size: int = 16
    seed: int = 0
    log_every: int = 25
    """Metrics on the fixed held-out batch every this many steps (and at the first and last step)."""
    probe_batch_size: int = 8
    """Sequences in that held-out batch: 8 x 128 tokens keep the probe under 2% of training time
    at the default cadence (benchmarks/throughput.py) while Kurt's sampling bias (2/n) stays negligible."""
    eval_every: int = 200
    """Validation loss every this many steps (and at the end); the train loss is logged every step."""
    eval_batches: int = 4
    checkpoint_every: int = 100
    threads: int = 1
    """torch CPU threads; resume reproduces an uninterrupted run exactly with the same threads."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU, but never CPU in a job given GPUs: ofe.train.parallel.DeviceError),
    'cpu', 'cuda' or 'cuda:N'. With several processes per node each takes cuda:LOCAL_RANK."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """'auto': bf16 autocast on CUDA, fp32 on CPU. bf16 is autocast on every path (ddp and fsdp): weights,
    residual stream and norms stay fp32, matmuls run in bf16. Never TF32; metrics are always fp32."""
    compile: bool = False
    """torch.compile the training forward/backward (the probe runs on the uncompiled module)."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward in each process; null: the whole per-process batch (batch_size /
    processes) at once. Smaller values accumulate gradients over micro-batches (same update, less
    activation memory); it must divide the per-process batch."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """With more than one process: 'ddp' replicates the model; 'fsdp' shards parameters, gradients
    and optimiser state over the processes (FSDP2) and writes sharded checkpoints. Elementwise
    optimisers only under 'fsdp' (see ofe.config.check_parallel)."""

    def __post_init__(self) -> None:
        check_fields(self, "train")  # device too: its value reaches a shell command and torch
        check_micro_batch(self)


def micro_batch_choices(per_process: int) -> list[int]:
    """The micro-batch sizes that split a per-process batch of `per_process` sequences evenly."""
    return [d for d in range(1, per_process + 1) if per_process % d == 0]


def check_micro_batch(tc: TrainConfig, processes: int = 1) -> None:
    """ConfigError unless `train.micro_batch_size` divides the per-process batch (batch_size /
    processes). At config time the number of processes is unknown, so 1 is assumed (a necessary
    condition); the trainer checks again with the real number at launch."""
    if tc.batch_size % processes:
        raise ConfigError(f"train.batch_size: {tc.batch_size} is not divisible by {processes} processes")
    per = tc.batch_size // processes
    mb = tc.micro_batch_size
    if mb is not None and per % mb:
        where = f" with {processes} processes" if processes > 1 else ""
        raise ConfigError(f"train.micro_batch_size: {mb} does not divide the per-process batch of {per} "
                          f"(train.batch_size {tc.batch_size}{where}); choose null or one of "
                          f"{micro_batch_choices(per)}")


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from. `stdlib` is the embedded corpus (no network): the running
    interpreter's standard-library .py files. Otherwise `path` is a `datasets.load_dataset` name:
    a hub dataset, or a builder ('text', 'json', 'parquet', 'csv') with `data_files`."""

    source: Literal["stdlib", "datasets"] = "stdlib"
    path: str | None = None
    name: str | None = None
    data_files: Any = None
    text_column: str = "text"
    split: str = "train"
    val_split: str | None = None
    """Use this split for validation; if unset, hold out `val_fraction` of the documents by hash."""
    val_fraction: float = 0.05
    tokenizer: str = "bytes"
    """'bytes' (vocab 256) or a `transformers` tokenizer name or path (optional dependency)."""
    max_documents: int | None = None

    def __post_init__(self) -> None:
        check_fields(self, "data")
        if self.source == "datasets" and not self.path:
            raise ConfigError("data.path: required when data.source is 'datasets' (e.g. 'text' or a hub name)")

    @property
    def cache_id(self) -> str:
        """A readable, content-addressed folder name: every run on the same data shares it."""
        digest = hashlib.sha1(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()
        stem = "stdlib" if self.source == "stdlib" else str(self.path).replace("/", "_")
        return f"{stem}-{digest[:10]}"


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs, plus the grid labels it was expanded from."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grid: dict[str, Any] = field(default_factory=dict)
    """The grid point (block, beta, optimizer, lr, scale, seed, extras): labels only, not read by training."""
    data_dir: str | None = None
    """The prepared token cache (see `ofe.core.data.prepare`)."""

    def __post_init__(self) -> None:
        check_parallel(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, as `dataclasses.asdict` gives, at a fifth of its cost (a 10,000-run plan
        serialises every run): sections are flat, so only their list, tuple and dict values are copied."""
        out: dict[str, Any] = {}
        for name in _field_names(RunConfig):
            value = getattr(self, name)
            if name in SECTIONS:
                value = {k: v if isinstance(v, (str, int, float, type(None))) else copy.deepcopy(v)
                         for k, v in vars(value).items()}
            out[name] = copy.deepcopy(value) if isinstance(value, (dict, list)) and name not in SECTIONS else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def config_hash(self) -> str:
        """The config's identity: a hash of everything training reads, in canonical JSON. The grid labels
        and the token cache's path are left out (labels are not read by training; the cache folder is
        already content-addressed by the data config, which is in). A trained run's identity also holds
        the device type and dtype it resolved to (`run_identity`)."""
        return config_hash(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        _reject_unknown("", d, [f.name for f in dataclasses.fields(cls)])
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in SECTIONS:
                kwargs[key] = build_section(SECTIONS[key], value or {}, key + ".")
            else:
                kwargs[key] = value
        return cls(**kwargs)


# Optimisers whose update of a parameter is not a function of that parameter's entries alone: FSDP
# gives each process a flat slice of every matrix, so these would see a fragment of the matrix.
# adafactor's row/column second-moment statistics, soap's and rotated_adafactor's eigenbases (G G^T of
# the whole gradient) and muon's Newton-Schulz orthogonalisation all need the whole matrix.
FSDP_REFUSED: dict[str, str] = {
    "adafactor": "its row and column second-moment statistics need whole matrices",
    "soap": "its Shampoo eigenbasis (G G^T, G^T G) needs whole matrices",
    "rotated_adafactor": "its Shampoo eigenbasis and factored statistics need whole matrices",
    "muon": "its Newton-Schulz orthogonalisation needs whole matrices",
}


def check_parallel(cfg: RunConfig) -> None:
    """ConfigError when `train.parallel: fsdp` meets an optimiser that needs whole matrices
    (`FSDP_REFUSED`): refused when the config is built, so a plan fails before any job starts."""
    name = cfg.optim.name
    if cfg.train.parallel == "fsdp" and name in FSDP_REFUSED:
        raise ConfigError(
            f"optim.name: {name!r} cannot run with train.parallel: fsdp ({FSDP_REFUSED[name]}, and FSDP "
            f"gives each process a slice of it); use train.parallel: ddp, or an elementwise optimiser "
            f"such as 'adamw'")


# Fields added after results existed, each with the value that does what runs did before the field
# existed. A value equal to it is left out of the hash, so adding a knob that changes nothing by default
# never turns finished runs into "another config" (to be moved aside and retrained); any other value,
# a later change of the default included, is in the hash. Add every new field here with its neutral value.
# device_type and dtype are not config fields but what `run_identity` adds: the resolved device type
# and compute dtype, neutral at CPU fp32, the only way runs trained before they were hashed.
HASH_NEUTRAL: dict[str, dict[str, Any]] = {"train": {"micro_batch_size": None, "parallel": "ddp",
                                                     "device_type": "cpu", "dtype": "float32"},
                                           "model": {"embed_proj": False, "attention": "softmax", "clip_zeta": 1.0,
                                                     "clip_gamma": None}}


def config_hash(run_config: dict[str, Any]) -> str:
    """`RunConfig.config_hash` of a config in its dict form (as stored in checkpoints and summaries)."""
    identity = {k: v for k, v in run_config.items() if k not in ("grid", "data_dir")}
    for section, neutral in HASH_NEUTRAL.items():
        if isinstance(identity.get(section), dict):
            identity[section] = {k: v for k, v in identity[section].items()
                                 if not (k in neutral and v == neutral[k])}
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def run_identity(run_config: dict[str, Any], device_type: str, dtype: str) -> str:
    """The identity of a run as trained: `config_hash` with the resolved device type ('cpu', 'cuda') and
    compute dtype ('float32', 'bfloat16') added to its train section. `device: auto` and `precision: auto`
    mean CPU fp32 on one host and CUDA bf16 on another: a checkpoint or summary of one is not a result of
    the other (different numerics), so neither resumes nor counts as finished there. At CPU fp32 (neutral,
    `HASH_NEUTRAL`) it equals `config_hash`. What the workflow plans and compares stays `config_hash`."""
    train = {**run_config.get("train", {}), "device_type": device_type, "dtype": dtype}
    return config_hash({**run_config, "train": train})


def _reject_unknown(prefix: str, d: dict[str, Any], allowed: Iterable[str]) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {d!r}")
    for key in d:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key}: unknown key; allowed keys are {sorted(allowed)}")


@functools.lru_cache(maxsize=None)
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def build_section(cls: type, d: dict[str, Any], prefix: str) -> Any:
    """Build one config dataclass from a mapping, naming the bad key on error. A class that does not
    validate itself (QuantConfig) gets the same type and range checks here."""
    _reject_unknown(prefix, d, _field_names(cls))
    if cls not in SECTIONS.values():
        checkers = field_checkers(cls, prefix.rstrip("."))
        d = {k: checkers[k](v, f"{prefix}{k}") for k, v in d.items()}
    try:
        return cls(**d)
    except TypeError as e:  # a check above should have caught it; still name the section
        raise ConfigError(f"{prefix.rstrip('.')}: {e}") from e


SECTIONS.update(model=ModelConfig, optim=OptimConfig, train=TrainConfig, data=DataConfig)


def section_fields(section: str) -> list[str]:
    """Field names of a section ('model', 'optim', 'train', 'data'): the keys a study may sweep."""
    return [f.name for f in dataclasses.fields(SECTIONS[section])]
