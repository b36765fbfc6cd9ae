"""Typed, validated configuration of one run: model, optimiser, training, data.

Frozen dataclasses with docstrings; every ablation is a field. `RunConfig.from_dict` rejects unknown
keys and bad values with a message naming the field and the allowed values, so a typo fails before
any job starts. JSON in and out (`to_dict` / `from_dict`) is what travels between workflow steps.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

NormKind = Literal["layernorm", "rmsnorm", "srms", "none"]  # srms: RMSNorm without a gain


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""


@functools.lru_cache(maxsize=None)
def _choices(cls: type) -> dict[str, tuple]:
    """Field name -> allowed values, for every Literal-typed field of a config class (resolving the
    annotations is slow, and a 10,000-run grid validates 50,000 configs)."""
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_args(hints[f.name]) for f in dataclasses.fields(cls)
            if typing.get_origin(hints[f.name]) is Literal}


def _check_choices(obj: Any, prefix: str) -> None:
    """Validate every Literal-typed field of a dataclass instance against its allowed values."""
    for name, allowed in _choices(type(obj)).items():
        if getattr(obj, name) not in allowed:
            raise ConfigError(f"{prefix}{name}: {getattr(obj, name)!r} is not allowed; choose one of {list(allowed)}")


def _positive(prefix: str, **values: float) -> None:
    for name, v in values.items():
        if not v > 0:
            raise ConfigError(f"{prefix}{name}: must be > 0, got {v!r}")


@dataclass(frozen=True)
class ModelConfig:
    """A GPT-style causal decoder (PAPER.md section 2); every block variant is a field here."""

    vocab_size: int = 256
    context: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    norm: NormKind = "layernorm"
    """Norm inside the blocks ('none' for OP and no-norm blocks)."""
    norm_position: Literal["pre", "post"] = "pre"
    """pre: x + f(norm(x)); post: norm(x + f(x)) (Post-LN)."""
    qk_norm: Literal["none", "rms"] = "none"
    """RMSNorm of queries and keys over the head dimension, with a learnable gain (entropy regulation)."""
    logit_cap: float | None = None
    """tanh soft-cap of attention logits (30 in PAPER.md section 2), the alternative to QK-norm."""
    beta: float = 1.0
    """Residual branch gain: x + beta * f(x). OP uses 0.2 at 12 layers, O(1/sqrt(depth))."""
    beta_trainable: bool = False
    """Make beta a trainable scalar per branch (initialised at `beta`)."""
    final_norm: NormKind = "layernorm"
    """Norm before the unembedding ('none': the paper's OP)."""
    embed_norm: NormKind = "none"
    """Norm of the embedding sum, the input of block 0 (the public code's OP keeps a LayerNorm)."""
    init_std: float = 0.02
    embed_init_std: float = 0.02
    scale_residual_init: bool = True
    """GPT-2's 1/sqrt(2 n_layer) scaling of the output projections' init."""
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        _check_choices(self, "model.")
        _positive("model.", vocab_size=self.vocab_size, context=self.context, n_layer=self.n_layer,
                  n_head=self.n_head, d_model=self.d_model)
        if self.d_model % self.n_head:
            raise ConfigError(f"model.d_model: {self.d_model} is not divisible by n_head={self.n_head}")
        if self.logit_cap is not None:
            _positive("model.", logit_cap=self.logit_cap)

    @property
    def n_params_approx(self) -> int:
        d, L = self.d_model, self.n_layer
        return self.vocab_size * d + self.context * d + L * (4 + 2 * self.mlp_ratio) * d * d


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and LR schedule (PAPER.md section 3 for the public code's defaults)."""

    name: Literal["adamw", "adafactor", "soap", "rotated_adafactor"] = "adamw"
    """adamw (diagonal), soap (Adam in Shampoo's eigenbasis), adafactor (factored second moment) and
    rotated_adafactor (the same in Shampoo's eigenbasis); see ofe.optim.make_optimizer."""
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
        object.__setattr__(self, "betas", tuple(self.betas))
        _check_choices(self, "optim.")
        _positive("optim.", lr=self.lr, eps=self.eps, precondition_frequency=self.precondition_frequency,
                  max_precond_dim=self.max_precond_dim)
        if not 0 <= self.warmup_frac < 1:
            raise ConfigError(f"optim.warmup_frac: must be in [0, 1), got {self.warmup_frac!r}")


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
    """'auto' (CUDA when available, else CPU), 'cpu' or 'cuda'."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """'auto': bf16 autocast on CUDA (TF32 matmuls too), fp32 on CPU. Metrics are always fp32."""
    compile: bool = False
    """torch.compile the training forward/backward (the probe runs on the uncompiled module)."""

    def __post_init__(self) -> None:
        _positive("train.", steps=self.steps, batch_size=self.batch_size, log_every=self.log_every,
                  probe_batch_size=self.probe_batch_size,
                  eval_every=self.eval_every, eval_batches=self.eval_batches,
                  checkpoint_every=self.checkpoint_every, threads=self.threads)


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
        _check_choices(self, "data.")
        if self.source == "datasets" and not self.path:
            raise ConfigError("data.path: required when data.source is 'datasets' (e.g. 'text' or a hub name)")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction: must be in (0, 1), got {self.val_fraction!r}")

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
    """The prepared token cache (see `ofe.data.prepare`)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def config_hash(self) -> str:
        """The run's identity: a hash of everything training reads, in canonical JSON. The grid labels
        and the token cache's path are left out (labels are not read by training; the cache folder is
        already content-addressed by the data config, which is in)."""
        return config_hash(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        sections = {"model": ModelConfig, "optim": OptimConfig, "train": TrainConfig, "data": DataConfig}
        _reject_unknown("", d, [f.name for f in dataclasses.fields(cls)])
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in sections:
                kwargs[key] = build_section(sections[key], value or {}, key + ".")
            else:
                kwargs[key] = value
        return cls(**kwargs)


def config_hash(run_config: dict[str, Any]) -> str:
    """`RunConfig.config_hash` of a config in its dict form (as stored in checkpoints and summaries)."""
    identity = {k: v for k, v in run_config.items() if k not in ("grid", "data_dir")}
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _reject_unknown(prefix: str, d: dict[str, Any], allowed: list[str]) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {d!r}")
    for key in d:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key}: unknown key; allowed keys are {sorted(allowed)}")


def build_section(cls: type, d: dict[str, Any], prefix: str) -> Any:
    """Build one config dataclass from a mapping, naming the bad key on error."""
    _reject_unknown(prefix, d, [f.name for f in dataclasses.fields(cls)])
    try:
        return cls(**d)
    except TypeError as e:  # e.g. a list where a number belongs
        raise ConfigError(f"{prefix}: {e}") from e


def section_fields(section: str) -> list[str]:
    """Field names of a section ('model', 'optim', 'train', 'data'): the keys a study may sweep."""
    cls = {"model": ModelConfig, "optim": OptimConfig, "train": TrainConfig, "data": DataConfig}[section]
    return [f.name for f in dataclasses.fields(cls)]
