"""The hidden state a forward hook sees, for ofe's GPT and transformers' models alike: the quantisers'
hook sites (`ofe.core.quant.Site`) and the pretrained probe (`ofe.pretrained.hf.probe`) both read it."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def layer_input(args: tuple, kwargs: dict) -> Tensor | None:
    """The hidden state a module is called with: the first positional argument in ofe's GPT and every
    family here, `hidden_states=` in families that pass it by keyword."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    x = kwargs.get("hidden_states")
    return x if isinstance(x, Tensor) else None


def first_tensor(output: Any) -> Tensor:
    """A module's output hidden state (older transformers' decoder layers return a tuple whose first item it is)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def dotted_attr(obj: Any, dotted: str) -> Any:
    """obj.a.b.c for "a.b.c", or None where a part is missing (where a model family keeps a module)."""
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
