"""Per-field checks of the config dataclasses, driven by their type hints.

Each field is checked against its type hint (an int is not a bool, a float, nor a string; floats are
finite), its range in LIMITS, its choices (Literal) and, for a few, a validator: a wrong value fails
in __post_init__, by name, not as a TypeError deep inside training. The checkers are built once per
field, since a 20,000-run grid checks a few million values.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re
import types
import typing
from typing import Any, Callable, Literal

_INT_TEXT = re.compile(r"[+-]?\d+")
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # no 'inf'/'nan': never meant
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

# Allowed ranges of numeric fields, as intervals ("(0, inf)": > 0), checked after the type with the key
# in the message. A None in a nullable field (clip, logit_cap, ...) is not range-checked.
LIMITS: dict[str, str] = {
    **{f"model.{k}": "(0, inf)" for k in ("vocab_size", "context", "n_layer", "n_head", "d_model",
                                          "mlp_ratio", "logit_cap", "init_std", "embed_init_std")},
    "model.beta": "[0, inf)",  # 0 switches the branches off: a valid model; config files ask > 0 (grid.py)
    "model.clip_zeta": "[1, inf)", "model.clip_gamma": "(-inf, 0]",  # the clipped softmax stretches outwards
    "optim.lr": "(0, inf)", "optim.betas": "[0, 1)", "optim.eps": "(0, inf)",
    "optim.weight_decay": "[0, inf)", "optim.warmup_frac": "[0, 1)", "optim.min_lr_frac": "[0, 1]",
    "optim.clip": "(0, inf)", "optim.precondition_frequency": "(0, inf)",
    "optim.max_precond_dim": "(0, inf)", "optim.shampoo_beta": "[0, 1)",
    **{f"train.{k}": "(0, inf)" for k in ("steps", "batch_size", "log_every", "probe_batch_size",
                                          "eval_every", "eval_batches", "checkpoint_every", "threads",
                                          "micro_batch_size")},
    "train.seed": "[0, inf)",
    "data.val_fraction": "(0, 1)", "data.max_documents": "(0, inf)",
    "quant.percentile": "(50, 100]", "quant.calib_batches": "(0, inf)", "quant.eval_batches": "(0, inf)",
}


# Section name -> its config class ('model': ModelConfig, ...); ofe.config registers them.
SECTIONS: dict[str, type] = {}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""


def number_from_text(text: str, kind: type) -> int | float | None:
    """The number a numeric string means ('300' for an int, '1e-2' or '.5' for a float; YAML 1.1
    reads 1e-2 as a string), else None. Never 'inf' or 'nan'."""
    text = text.strip()
    if kind is int and _INT_TEXT.fullmatch(text):
        return int(text)
    if kind is float and _FLOAT_TEXT.fullmatch(text):
        return float(text)
    return None


def _interval(text: str) -> tuple[float, bool, float, bool]:
    """'[0, 1)' -> (0.0, True, 1.0, False): low, low included, high, high included."""
    lo, hi = (float(x) for x in text[1:-1].split(","))
    return lo, text[0] == "[", hi, text[-1] == "]"


def _range_error(key: str, value: float, text: str, null: str) -> ConfigError:
    lo, lo_closed, hi, _ = _interval(text)
    allowed = f"{'>=' if lo_closed else '>'} {lo:g}" if hi == math.inf else f"in {text}"
    return ConfigError(f"{key}: must be {allowed}{null}, got {value!r}")


def _device_problem(value: str) -> str | None:
    if _DEVICE.fullmatch(value):
        return None
    return f"{value!r} is not allowed; choose 'auto', 'cpu', 'cuda' or 'cuda:N' (N a GPU index)"


@functools.lru_cache(maxsize=None)
def has_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def _tokenizer_problem(value: str) -> str | None:
    if value == "bytes":
        return None
    if not (_HUB_ID.fullmatch(value) or os.path.exists(value)):
        return (f"{value!r} is neither 'bytes', an existing local path nor a tokenizer name on the hub "
                f"(such as 'gpt2' or 'org/name')")
    if not has_transformers():
        return f"{value!r} needs transformers: install transformers (pip install transformers) or use 'bytes'"
    return None


VALIDATORS: dict[str, Callable[[Any], str | None]] = {
    "train.device": _device_problem, "data.tokenizer": _tokenizer_problem}


def _checker(hint: Any, key: str) -> Callable[..., Any]:
    """A function (value, where=key) -> the value normalised (an int in a float field becomes a float, a
    list in a tuple field a tuple), or ConfigError naming `where` and what the type hint `hint` allows.
    `key` is the field's dotted name ('optim.betas'), for its range (LIMITS) and VALIDATORS. Built
    once per field: a 20,000-run grid checks a few million values."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    nullable = origin in (typing.Union, types.UnionType) and type(None) in args
    if nullable:
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    null = " or null" if nullable else ""
    limit, validator = LIMITS.get(key), VALIDATORS.get(key)
    lo, lo_closed, hi, hi_closed = _interval(limit) if limit else (-math.inf, True, math.inf, True)
    what = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}

    def scalar(value: Any, where: str, kind: Any) -> Any:
        t = type(value)  # not isinstance: True is an int to Python, never to a config
        if not (t is kind or (kind is float and t is int) or (kind is str and isinstance(value, str))):
            raise ConfigError(f"{where}: must be {what[kind]}{null}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number{null}, got {value!r}")
        if limit and not ((value >= lo if lo_closed else value > lo) and (value <= hi if hi_closed else value < hi)):
            raise _range_error(where, value, limit, null)
        if validator and (problem := validator(value)):
            raise ConfigError(f"{where}: {problem}")
        return float(value) if kind is float else value  # 1 and 1.0: one config, hash and folder

    def check(value: Any, where: str = key) -> Any:
        if value is None and nullable:
            return None
        if origin is Literal:
            if isinstance(value, (list, dict)) or value not in args:
                raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {list(args)}")
            return value
        if origin is tuple:  # tuple[float, float] (exactly two) or tuple[int, ...] (any length)
            kinds = [args[0]] * len(value) if args[-1] is ... and isinstance(value, (list, tuple)) else list(args)
            if not isinstance(value, (list, tuple)) or len(value) != len(kinds):
                items = {int: "integers", float: "numbers", str: "strings"}.get(args[0], "values")
                n = "a list of" if args[-1] is ... else f"a list of {len(args)}"
                raise ConfigError(f"{where}: must be {n} {items}{null}, got {value!r}")
            return tuple(scalar(v, f"{where}[{i}]", k) for i, (v, k) in enumerate(zip(value, kinds)))
        if hint in what:
            return scalar(value, where, hint)
        return value  # Any, dict: not checked here

    return check


@functools.lru_cache(maxsize=None)
def field_checkers(cls: type, section: str) -> dict[str, Callable[..., Any]]:
    """Field name -> checker, for a config class (resolving the annotations is slow)."""
    hints = typing.get_type_hints(cls)
    return {f.name: _checker(hints[f.name], f"{section}.{f.name}") for f in dataclasses.fields(cls)}


def check_field(section: str, name: str, value: Any, key: str | None = None) -> Any:
    """Check one value of a section's field (type, finiteness, range, choices), naming `key` (default
    'section.name') on error; returns it normalised. Also for grid.py, which checks a study's axis
    values at their own keys ('studies.lr.grid.optim.eps[2]')."""
    return field_checkers(SECTIONS[section], section)[name](value, key or f"{section}.{name}")


@functools.lru_cache(maxsize=None)
def field_kind(section: str, name: str) -> type | None:
    """int or float for a numeric field (or a tuple of numbers), else None: which strings are numbers."""
    hint = typing.get_type_hints(SECTIONS[section])[name]
    for h in (hint, *typing.get_args(hint)):
        if h in (int, float):
            return h
    return None


def check_fields(obj: Any, section: str) -> None:
    """Type, range and choices of every field of a config dataclass instance (in __post_init__)."""
    for name, check in field_checkers(type(obj), section).items():
        value = getattr(obj, name)
        if (new := check(value)) is not value:
            object.__setattr__(obj, name, new)
