"""A run's identity: every field training reads is in the hash, except a field added later at the value
that does what runs did before it existed (so finished results survive an upgrade that adds a knob)."""

from __future__ import annotations

import hashlib
import json

from ofe.config import HASH_NEUTRAL, DataConfig, RunConfig, TrainConfig


def _hash_of(d: dict) -> str:
    """The hash as it was computed before any field was added: sha256 of the canonical JSON."""
    identity = {k: v for k, v in d.items() if k not in ("grid", "data_dir")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":"), default=list)
                          .encode()).hexdigest()[:16]


def test_a_config_written_before_the_new_fields_keeps_its_hash() -> None:
    cfg = RunConfig()
    old = cfg.to_dict()
    for section, neutral in HASH_NEUTRAL.items():
        for key in neutral:
            del old[section][key]  # what a summary written before these fields existed holds
    assert cfg.config_hash() == _hash_of(old)


def test_a_non_neutral_value_of_a_new_field_is_part_of_the_identity() -> None:
    base = RunConfig()
    accumulated = RunConfig(train=TrainConfig(micro_batch_size=4))
    assert accumulated.config_hash() != base.config_hash()
    assert accumulated.config_hash() == _hash_of(accumulated.to_dict() | {
        "train": {k: v for k, v in accumulated.to_dict()["train"].items() if k != "parallel"}})


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
