"""The tokenizer's vocabulary at plan time, so that a model.vocab_size too small for it fails before a
job starts, naming the key.

- 'bytes' is known without loading anything (256).
- A transformers tokenizer is loaded from this machine only (`local_files_only`: planning never uses
  the network): a local folder, or a hub name already in the Hugging Face cache. A local path that
  exists but holds no tokenizer transformers can load is refused, naming data.tokenizer.
- A hub name not in the local cache is not an error: the prepare step may download it on a machine
  with network, and training still compares the prepared data's vocabulary with the model's. In offline
  mode (HF_HUB_OFFLINE=1, `ofe.plan.offline`) it is: nothing could download it, so it is refused, naming
  data.tokenizer and the command that fills the cache.
A path that does not exist and is no hub name is refused earlier, by DataConfig (`ofe.config.fields`).
"""

from __future__ import annotations

import functools
import os

from ofe.config import ConfigError
from ofe.config.fields import has_transformers
from ofe.plan import offline
from ofe.plan.validate import TOKENIZER_VOCAB


def tokenizer_vocab(name: str) -> int | None:
    """The vocabulary size training will see for data.tokenizer `name` (`len(tokenizer)`, as
    `ofe.core.data.Tokenizer` counts it), or None where it cannot be known without the network."""
    if name in TOKENIZER_VOCAB:
        return TOKENIZER_VOCAB[name]
    if not has_transformers():  # DataConfig refuses such a name already; nothing to load it with
        return None
    if os.path.exists(name):  # transformers reads an existing path as a local folder, never the hub
        return _local_vocab(os.path.realpath(name), name)
    vocab = _hub_vocab(name, str(offline.hub_cache()))
    if vocab is None and (var := offline.hub_offline_var()) is not None:
        raise ConfigError(offline.not_cached("data.tokenizer", name, var, offline.tokenizer_fill_command(name)))
    return vocab


# Cached: a 10,000-run plan checks every run's vocab_size, and loading a tokenizer takes a while.
@functools.lru_cache(maxsize=32)
def _local_vocab(path: str, name: str) -> int:
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(path, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the prepare step would too
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"data.tokenizer: {name!r} exists but transformers cannot load a tokenizer from it "
                          f"({type(e).__name__}: {first}); give a folder written by save_pretrained, a hub "
                          f"name, or 'bytes'") from None


@functools.lru_cache(maxsize=32)
def _hub_vocab(name: str, cache_dir: str) -> int | None:
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(name, local_files_only=True, cache_dir=cache_dir))
    except Exception:  # noqa: BLE001 - not cached here (or not loadable offline): training checks it
        return None
