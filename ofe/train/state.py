"""A run's progress, everything its checkpoint holds besides the model, the optimiser and the run's
identity (config and config hash). One object, saved (`RunState.to_dict`) and restored
(`RunState.from_checkpoint`) whole: a field added here is in every checkpoint written and every resume,
and `ofe.train.checkpoint` requires it of a checkpoint it resumes."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

Row = tuple[int, int, int, str, str, float]  # one metric row: step, tokens, layer, site, metric, value


@dataclass
class RunState:
    """The next step to run, the metric rows logged so far, the seconds trained, the status ('running',
    then 'completed' or 'diverged'), and the updates skipped for a non-finite gradient norm, in all and
    in a row (their count decides a divergence, so it survives a resume)."""

    step: int = 0
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0
    status: str = "running"
    skipped_steps: int = 0
    consecutive_skips: int = 0

    @classmethod
    def keys(cls) -> frozenset[str]:
        """The entries a checkpoint must hold to be resumed exactly. The RNG state is not one of them:
        checkpoints of older versions lack it, and nothing in training draws from it today."""
        return frozenset(f.name for f in fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """This state as a checkpoint's entries, with torch's RNG state as it is now."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "rng": torch.get_rng_state()}

    @classmethod
    def from_checkpoint(cls, ck: dict[str, Any]) -> RunState:
        """The state a checkpoint (`to_dict`'s entries among others) recorded; restores torch's RNG state
        where it recorded one, so a resumed run would draw what the uninterrupted one draws."""
        if "rng" in ck:
            torch.set_rng_state(ck["rng"])
        state = cls(**{name: ck[name] for name in cls.keys()})
        state.rows = [tuple(r) for r in state.rows]  # the rows as the trainer appends them
        return state
