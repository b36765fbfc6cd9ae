"""The int8 evaluation's settings (`QuantConfig`): which protocols at which bit widths, how ranges are set.

Torch-free, so that planning a grid never imports torch. Two protocols are simulated (fake quantisation,
`ofe.core.quant`); `torchao_dynamic` runs torchao's real int8 kernels (`ofe.core.torchao_int8`). torchao
is an optional dependency (`pip install -e '.[int8]'`): asking for it without torchao installed fails
here, when the config is read (check-config, the workflow's parse), before any job starts.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Literal

from ofe.config.fields import ConfigError

TORCHAO = "torchao_dynamic"
# The simulated protocols: every config measured them before torchao_dynamic existed, and the default
# (QuantConfig.protocols) stays these two, so torchao remains opt-in.
SIMULATED: tuple[str, ...] = ("static_per_tensor", "dynamic_per_token")
PROTOCOLS: tuple[str, ...] = (*SIMULATED, TORCHAO)
# Bit widths ofe.core.quant is tested at; the schema's quant.bits enum lists the same (a test compares them),
# so a config file and `--quant-json` on the command line accept exactly one set.
SUPPORTED_BITS: tuple[int, ...] = (4, 6, 8)
# torchao's Int8DynamicActivationInt8WeightConfig is int8 and nothing else.
TORCHAO_BITS: tuple[int, ...] = (8,)
# The torchao release whose int8 path (Int8Tensor, version-2 config) ofe's docs and agreement tests describe.
TORCHAO_MIN_VERSION = (0, 18)
INSTALL_HINT = "pip install -e '.[int8]' (or pip install 'torchao>=0.18')"


def torchao_missing() -> str | None:
    """Why torchao cannot serve `torchao_dynamic` here (not installed, too old), or None. Reads the
    installed metadata only: importing torchao would import torch, and planning must not."""
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed"
    try:
        version = importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return None  # importable without metadata (a source checkout): let the import decide
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    if parts < TORCHAO_MIN_VERSION:
        return f"torchao {version} is installed, older than {'.'.join(map(str, TORCHAO_MIN_VERSION))}"
    return None


@dataclass(frozen=True)
class QuantConfig:
    """Which int8 protocols and bit widths to evaluate (`ofe.core.quant`), and how ranges are set."""

    protocols: tuple[str, ...] = SIMULATED
    """static_per_tensor and dynamic_per_token (simulated), torchao_dynamic (torchao's real int8 kernels,
    8 bits only: measured at 8 whatever else `bits` lists; opt-in, needs the `int8` extra)."""
    bits: tuple[int, ...] = (8,)
    """8 is W8A8; 6 and 4 expose the effect at tiny scale, where 8 bits may hide it."""
    weight_range: Literal["mse", "absmax"] = "mse"
    """Simulated protocols only: torchao_dynamic's weight ranges are always absmax (per output channel)."""
    percentile: float = 99.999
    """Static activation ranges: running min-max of this percentile over the calibration batches."""
    calib_batches: int = 4
    eval_batches: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocols", tuple(self.protocols))
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
        for i, p in enumerate(self.protocols):
            if p not in PROTOCOLS:
                raise ConfigError(f"quant.protocols[{i}]: {p!r} is not allowed; choose from {list(PROTOCOLS)}")
        for i, b in enumerate(self.bits):
            if b not in SUPPORTED_BITS:
                raise ConfigError(f"quant.bits[{i}]: {b} is not allowed; choose from {list(SUPPORTED_BITS)}")
        if self.weight_range not in ("mse", "absmax"):
            raise ConfigError(f"quant.weight_range: {self.weight_range!r}; choose 'mse' or 'absmax'")
        if TORCHAO in self.protocols:
            if not set(TORCHAO_BITS) & set(self.bits):
                raise ConfigError(f"quant.protocols: {TORCHAO!r} runs torchao's int8 kernels, 8 bits only, but "
                                  f"quant.bits is {list(self.bits)}: add 8 to quant.bits or drop {TORCHAO!r}")
            missing = torchao_missing()
            if missing:
                raise ConfigError(f"quant.protocols: {TORCHAO!r} needs torchao >= 0.18 and {missing}: "
                                  f"{INSTALL_HINT}, or drop {TORCHAO!r} from quant.protocols")

    def pairs(self) -> list[tuple[str, int]]:
        """The (protocol, bits) rows to measure, in order: each simulated protocol at every bit width,
        torchao_dynamic at 8 bits only (its kernels have no other width)."""
        return [(p, b) for p in self.protocols for b in self.bits if p != TORCHAO or b in TORCHAO_BITS]
