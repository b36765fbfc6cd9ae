"""The configuration of one run: typed, validated, frozen dataclasses (`run`) and the per-field checks
they run (`fields`). Torch-free; every other part of ofe reads its settings from here.

The public names of these modules, and of `quant` (the int8 evaluation's section), are re-exported, so
`from ofe.config import RunConfig` is the import.
"""

from ofe.config.fields import (LIMITS, SECTIONS, VALIDATORS, ConfigError, check_field, field_kind,
                               number_from_text)
from ofe.config.quant import PROTOCOLS, SIMULATED, SUPPORTED_BITS, TORCHAO, QuantConfig, torchao_missing
from ofe.config.run import (FSDP_REFUSED, HASH_NEUTRAL, AttentionKind, DataConfig, ModelConfig, NormKind,
                            OptimConfig, RunConfig, TrainConfig, build_section, check_micro_batch, check_parallel,
                            config_hash, micro_batch_choices, run_identity, section_fields)

__all__ = [
    "LIMITS", "SECTIONS", "VALIDATORS", "ConfigError", "check_field", "field_kind", "number_from_text",
    "FSDP_REFUSED", "HASH_NEUTRAL", "PROTOCOLS", "SIMULATED", "SUPPORTED_BITS", "TORCHAO", "AttentionKind",
    "DataConfig", "ModelConfig", "NormKind", "OptimConfig", "QuantConfig", "RunConfig", "TrainConfig",
    "build_section", "check_micro_batch", "check_parallel", "config_hash", "micro_batch_choices", "run_identity",
    "section_fields", "torchao_missing",
]
