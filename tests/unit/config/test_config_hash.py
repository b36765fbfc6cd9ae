"""A run's identity: every field training reads is in the hash, except a field added later at the value
that does what runs did before it existed (so finished results survive an upgrade that adds a knob)."""

from __future__ import annotations

import hashlib
import json

from ofe.config import HASH_NEUTRAL, DataConfig, ModelConfig, RunConfig, TrainConfig, config_hash, run_identity


def _hash_of(d: dict) -> str:
    """The hash as it was computed before any field was added: sha256 of the canonical JSON."""
    identity = {k: v for k, v in d.items() if k not in ("grid", "data_dir")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":"), default=list)
                          .encode()).hexdigest()[:16]


def _without_new_model_fields(d: dict) -> dict:
    """`d` as written before the model's later fields existed (they are at their neutral values here)."""
    return {**d, "model": {k: v for k, v in d["model"].items() if k not in HASH_NEUTRAL["model"]}}


def test_a_config_written_before_the_new_fields_keeps_its_hash() -> None:
    cfg = RunConfig()
    old = cfg.to_dict()
    for section, neutral in HASH_NEUTRAL.items():
        for key in neutral:  # device_type and dtype are run_identity's, never in the config's dict
            old[section].pop(key, None)  # what a summary written before these fields existed holds
    assert cfg.config_hash() == _hash_of(old)


def _without(d: dict, section: str, keys: set[str]) -> dict:
    return d | {section: {k: v for k, v in d[section].items() if k not in keys}}


def test_a_non_neutral_value_of_a_new_field_is_part_of_the_identity() -> None:
    base = RunConfig()
    accumulated = RunConfig(train=TrainConfig(micro_batch_size=4))
    assert accumulated.config_hash() != base.config_hash()
    assert accumulated.config_hash() == _hash_of(_without_new_model_fields(accumulated.to_dict()) | {
        "train": {k: v for k, v in accumulated.to_dict()["train"].items() if k != "parallel"}})
    projected = RunConfig(model=ModelConfig(embed_proj=True))  # OSP's embedding projection
    assert projected.config_hash() != base.config_hash()
    d = projected.to_dict()
    d = {**d, "model": {k: v for k, v in d["model"].items() if k not in HASH_NEUTRAL["model"] or k == "embed_proj"}}
    assert projected.config_hash() == _hash_of(_without(d, "train", {"micro_batch_size", "parallel"}))


def test_every_other_field_changes_the_hash() -> None:
    base = RunConfig().config_hash()
    assert RunConfig(train=TrainConfig(steps=401)).config_hash() != base
    assert RunConfig(train=TrainConfig(parallel="fsdp")).config_hash() != base


def test_grid_labels_and_the_data_folder_are_not_the_identity() -> None:
    """Labels are not read by training and the token cache's folder is content-addressed by the data
    config (which is in the hash): a run moved to other labels or another cache path is the same run."""
    base = RunConfig()
    relabelled = RunConfig(grid={"block": "pre_ln", "seed": 7, "optim.eps": 1e-4}, data_dir="/elsewhere/abc")
    assert relabelled.config_hash() == base.config_hash()
    assert RunConfig(train=TrainConfig(batch_size=base.train.batch_size + 1)).config_hash() != base.config_hash()
    assert RunConfig(data=DataConfig(max_documents=10)).config_hash() != base.config_hash()  # the data is in


# RunConfig().config_hash() computed by the code before run_identity existed (commit 5cf4683): every
# CPU fp32 run must keep the identity it was trained under, or finished runs would be trained again.
DEFAULT_HASH_BEFORE_IDENTITY = "471acce597297176"


def test_a_cpu_fp32_run_keeps_the_hash_it_had_before_the_identity_held_its_device() -> None:
    cfg = RunConfig().to_dict()
    assert run_identity(cfg, "cpu", "float32") == DEFAULT_HASH_BEFORE_IDENTITY
    assert config_hash(cfg) == DEFAULT_HASH_BEFORE_IDENTITY  # the plan-level hash is unchanged too


def test_the_resolved_device_type_and_dtype_are_part_of_the_identity() -> None:
    cfg = RunConfig().to_dict()
    ids = {run_identity(cfg, d, t) for d in ("cpu", "cuda") for t in ("float32", "bfloat16")}
    assert len(ids) == 4  # a CPU fp32 checkpoint is no CUDA bf16 run's, nor CUDA fp32's, nor CPU bf16's
    # what the identity hashes: the config with the two added to its train section
    cuda = {**cfg, "train": {**cfg["train"], "device_type": "cuda", "dtype": "bfloat16"}}
    assert run_identity(cfg, "cuda", "bfloat16") == _hash_of(
        _without_new_model_fields(cuda) | {"train": {k: v for k, v in cuda["train"].items() if k not in ("micro_batch_size", "parallel")}})
    assert run_identity(cfg, "cuda", "bfloat16") != config_hash(cfg)
