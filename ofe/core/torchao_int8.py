"""`torchao_dynamic`: W8A8 with torchao's real int8 kernels, beside the two simulated protocols of
`ofe.core.quant` (docs/int8.md, "Real int8 kernels").

torchao's `Int8DynamicActivationInt8WeightConfig` (version 2, torchao 0.18) swaps each selected
nn.Linear's weight for an `Int8Tensor`: int8 values with one absmax scale per output channel. At each
call the input is quantised to int8 with one absmax scale per token and the product runs as an integer
matmul with int32 accumulation (`torchao.kernel.intmm.int_scaled_matmul`: `torch._int_mm`, on a CPU
oneDNN's s8 x s8 -> s32 GEMM; on a GPU, by its source, cuBLAS: not run here yet), then is rescaled in floating point. It is the
simulated `dynamic_per_token` with absmax weight ranges, on a slightly different grid:

- scale = absmax / 127.5 and the grid [-128, 127] (ours: absmax / 127 and [-127, 127]); a value at
  +absmax lands on 127.5 (to float32 rounding), rounds to 127 or 128 and is clamped to 127;
- x * (1 / scale) is rounded, not x / scale; scales are clamped below at float32's eps (ours at 1e-12).

Only nn.Linear layers are quantised, as by the simulated protocols: the attention products (q k^T,
p v), the tied LM head (a matmul with the embedding table), OSP's embedding projections (`EmbedProj`, not
an nn.Linear) and every norm stay in full precision. torchao is imported here, lazily: only a config
that names the protocol pays its import (and its optional dependency).
"""

from __future__ import annotations

import copy
import functools
import logging
import re
from typing import Any, Callable

from torch import nn

from ofe.config.quant import INSTALL_HINT, TORCHAO_BITS

# What torchao logs on import that says nothing about the int8 path: its CUDA-only extension libraries
# (mxfp8, CUTLASS for sm90a) failing to load on a CPU host or another Python, the absence of triton (GPU
# autotuned kernels, off by default), and torch's deprecation note on an Enum torchao registers. Matched
# exactly, so any other warning or error still reaches the log.
_IMPORT_NOISE = {
    "torchao": re.compile(r"Failed to load .*/torchao/_C_(mxfp8|cutlass_90a)[^/]*\.so"),
    "torchao.kernel.intmm": re.compile(r"Warning: Detected no triton"),
    "torch.utils._pytree": re.compile(r"<enum '\w+'> is an Enum subclass and is now natively supported"),
}


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern, self.dropped = pattern, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.pattern.search(record.getMessage()):
            self.dropped += 1
            return False
        return True


_FILTERS: list[_DropMatching] = []


def quiet_torchao_import() -> None:
    """Keep `_IMPORT_NOISE` out of the logs, for the rest of the process (idempotent). Installed before
    torchao is imported: by `torchao_api`, and by `ofe.pretrained.hf.require_transformers`, since
    transformers imports torchao itself, when it is installed, as soon as a model class loads."""
    if _FILTERS:
        return
    for name, pattern in _IMPORT_NOISE.items():
        _FILTERS.append(_DropMatching(pattern))
        logging.getLogger(name).addFilter(_FILTERS[-1])


@functools.lru_cache(maxsize=None)
def torchao_api() -> tuple[Callable[..., Any], type]:
    """(torchao.quantization.quantize_, Int8DynamicActivationInt8WeightConfig), imported once, without the
    import-time noise of `_IMPORT_NOISE` (one line says how much was left out)."""
    quiet_torchao_import()
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as e:
        raise ImportError(f"the protocol 'torchao_dynamic' needs torchao: {INSTALL_HINT} ({e})") from e
    dropped = sum(f.dropped for f in _FILTERS)
    if dropped:
        print(f"[ofe] torchao imported; {dropped} import-time messages about its CUDA-only extensions, triton "
              "and a torch deprecation left out (the int8 path uses none of them)", flush=True)
    return quantize_, Int8DynamicActivationInt8WeightConfig


def quantised_copy(model: nn.Module, bits: int = 8) -> tuple[nn.Module, int]:
    """A deep copy of `model` (the original is untouched) whose nn.Linear layers run torchao's int8
    dynamic-activation, int8-weight kernels, and how many layers were quantised. Outside those layers
    the copy computes as the model does (dtype, device, full precision)."""
    q = copy.deepcopy(model).eval()
    return q, quantise_in_place(q, bits)


def quantise_in_place(q: nn.Module, bits: int = 8, skip: nn.Module | None = None) -> int:
    """`quantised_copy` on `q` itself (already a copy), every nn.Linear but `skip` (a transformers model's
    LM head, which the simulated protocols keep in full precision too); the number of layers quantised."""
    if bits not in TORCHAO_BITS:
        raise ValueError(f"torchao_dynamic runs torchao's int8 kernels only: bits must be 8, got {bits} "
                         "(the config measures this protocol at 8 bits only: QuantConfig.pairs)")
    quantize_, Int8Config = torchao_api()
    ids = {id(m) for m in q.modules() if is_quantised_linear(m, skip)}
    # set_inductor_config=False: the default would change torch._inductor's global settings, for every
    # later compile in this process, and ofe never compiles the quantised copy
    quantize_(q, Int8Config(set_inductor_config=False), filter_fn=lambda m, _name: id(m) in ids)
    return len(ids)


def is_quantised_linear(m: nn.Module, skip: nn.Module | None = None) -> bool:
    """The layers both dynamic protocols quantise: every nn.Linear but `skip` (compared by identity)."""
    return isinstance(m, nn.Linear) and m is not skip


def int8_weight_layers(model: nn.Module) -> list[str]:
    """Names of the layers whose weight is a torchao Int8Tensor (a check that the copy is quantised)."""
    return [name for name, m in model.named_modules()
            if type(getattr(m, "weight", None)).__name__ == "Int8Tensor"]
