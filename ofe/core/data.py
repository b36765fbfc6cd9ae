"""Datasets -> token arrays on disk -> batches.

`prepare` tokenises a dataset once into `DIR/{train,val}.bin` plus `DIR/meta.json` (written last, so
its presence means the cache is complete); every run on that data shares the folder. The default
corpus is the `.py` source of the running interpreter's standard library: real Python code on every
machine, a network-free stand-in for the paper's CodeParrot (docs/science.md section 4).
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ofe.config import ConfigError, DataConfig
from ofe.io import atomic_write_json, atomic_path, provenance
from ofe.plan import offline

EOS_BYTE = 0  # documents are joined with a NUL byte, which never occurs in Python source
FIXED_STREAM = 0xB0B  # seeds the held-out probe and validation batches: identical for every run


def stdlib_dataset():
    """The standard library's .py files (site-packages excluded) as a `datasets.Dataset`."""
    import datasets

    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(
        p for p in root.rglob("*.py")
        if not any(part in ("site-packages", "dist-packages") for part in p.relative_to(root).parts)
    )
    rel = [str(p.relative_to(root)) for p in paths]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
    return datasets.Dataset.from_dict({"path": rel, "text": texts})


def _is_val(key: str, val_fraction: float) -> bool:
    """Deterministic split by a document's key hash (the file path for the stdlib corpus)."""
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return (h % 10_000) < val_fraction * 10_000


def load_splits(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(train texts, validation texts) for the configured source."""
    if cfg.source == "stdlib":
        ds = stdlib_dataset()
        keys, texts = ds["path"], ds["text"]
    else:
        ds = _load_dataset(cfg, cfg.split)
        if cfg.text_column not in ds.column_names:
            raise ValueError(
                f"data.text_column: {cfg.text_column!r} is not a column of {cfg.path}; "
                f"columns are {ds.column_names}"
            )
        texts = ds[cfg.text_column]
        if cfg.val_split:
            val = _load_dataset(cfg, cfg.val_split)
            return _cap(texts, cfg), _cap(val[cfg.text_column], cfg)
        keys = [f"{i}:{t[:200]}" for i, t in enumerate(texts)]
    texts = _cap(texts, cfg)
    train = [t for k, t in zip(keys, texts) if not _is_val(k, cfg.val_fraction)]
    val = [t for k, t in zip(keys, texts) if _is_val(k, cfg.val_fraction)]
    if not train or not val:
        raise ValueError(f"data: the split left train={len(train)} / val={len(val)} documents; "
                         "add documents or change data.val_fraction")
    return train, val


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def _load_dataset(cfg: DataConfig, split: str):
    """`datasets.load_dataset` of the data section; a dataset that cannot be found or fetched (not cached
    while offline, no network, a wrong name) is a ConfigError naming data.path and the command that fills
    the cache, not a traceback."""
    import datasets

    try:
        return datasets.load_dataset(cfg.path, cfg.name, data_files=cfg.data_files, split=split)
    except OSError as e:  # ConnectionError, datasets' DatasetNotFoundError (a FileNotFoundError), ...
        hint = ""
        if offline.is_hub_dataset(cfg.path):
            var = offline.datasets_offline_var()
            why = f" ({var} forbids downloading)" if var else ""
            hint = (f"; if it is not in the local Hugging Face cache{why}, fill the cache on a machine with "
                    f"network: {offline.dataset_fill_command(cfg.path, cfg.name, split)}")
        raise ConfigError(f"data.path: dataset {cfg.path!r} (split {split!r}) could not be loaded "
                          f"({_first_line(e)}){hint}") from e


def _cap(texts: list[str], cfg: DataConfig) -> list[str]:
    return texts[: cfg.max_documents] if cfg.max_documents else texts


class Tokenizer:
    """Bytes (vocab 256) or a `transformers` tokenizer; `encode_docs` joins documents with EOS."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "bytes":
            self.vocab_size, self.eos, self._hf = 256, EOS_BYTE, None
        else:
            try:
                from transformers import AutoTokenizer
            except ImportError as e:
                raise ImportError(f"data.tokenizer={name!r} needs `pip install transformers`") from e
            self._hf = _load_tokenizer(AutoTokenizer, name)
            self.vocab_size = len(self._hf)
            self.eos = self._hf.eos_token_id if self._hf.eos_token_id is not None else 0

    def encode_docs(self, texts: list[str]) -> np.ndarray:
        dtype = np.uint8 if self.vocab_size <= 256 else np.uint32
        parts: list[np.ndarray] = []
        for t in texts:
            if self._hf is None:
                ids = np.frombuffer(t.encode("utf-8", errors="replace"), dtype=np.uint8)
            else:
                ids = np.asarray(self._hf(t)["input_ids"], dtype=dtype)
            parts.append(ids.astype(dtype, copy=False))
            parts.append(np.array([self.eos], dtype=dtype))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _load_tokenizer(auto: Any, name: str) -> Any:
    """`AutoTokenizer.from_pretrained(name)`; a tokenizer that is not cached while offline, not on the hub
    or not loadable is a ConfigError naming data.tokenizer and the command that fills the cache."""
    try:
        return auto.from_pretrained(name)
    except OSError as e:  # transformers wraps the hub's errors (offline, not found, gated) in OSError
        var = offline.hub_offline_var()
        why = f"; {var} forbids downloading it" if var else ""
        raise ConfigError(f"data.tokenizer: {name!r} could not be loaded ({_first_line(e)}){why}; if it is a hub "
                          f"name, fill the local Hugging Face cache on a machine with network: "
                          f"{offline.tokenizer_fill_command(name)}") from e


def prepare(cfg: DataConfig, out_dir: Path | str) -> dict:
    """Tokenise `cfg` once into `out_dir`; returns the metadata (also written to meta.json)."""
    out_dir = Path(out_dir)
    t0 = time.time()
    train_texts, val_texts = load_splits(cfg)
    tok = Tokenizer(cfg.tokenizer)
    arrays = {"train": tok.encode_docs(train_texts), "val": tok.encode_docs(val_texts)}
    for split, arr in arrays.items():
        with atomic_path(out_dir / f"{split}.bin") as tmp:
            arr.tofile(tmp)
    meta = {
        "vocab_size": tok.vocab_size,
        "dtype": str(arrays["train"].dtype),
        "tokens": {k: int(v.size) for k, v in arrays.items()},
        "documents": {"train": len(train_texts), "val": len(val_texts)},
        "config": cfg.__dict__,
        "python": sys.version,
        "seconds": round(time.time() - t0, 2),
        "provenance": provenance(),
    }
    atomic_write_json(out_dir / "meta.json", meta)  # last: its presence marks a complete cache
    return meta


class TokenData:
    """Random windows of the token cache; batch i of a stream is a pure function of (seed, i), so a
    resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, data_dir: Path | str, context: int, batch_size: int) -> None:
        data_dir = Path(data_dir)
        meta_path = data_dir / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} is missing: run `python -m ofe prepare` first")
        self.meta = json.loads(meta_path.read_text())
        dtype = np.dtype(self.meta["dtype"])
        self.splits = {s: np.memmap(data_dir / f"{s}.bin", dtype=dtype, mode="r") for s in ("train", "val")}
        self.context, self.batch_size = context, batch_size
        for s, arr in self.splits.items():
            if arr.size <= context + 1:
                raise ValueError(f"data: the {s} split has {arr.size} tokens, fewer than context+1={context + 1}")

    def batch(self, split: str, seed_words: list[int], batch_size: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of shape (batch_size, context), windows drawn by a generator seeded with `seed_words`."""
        arr = self.splits[split]
        rng = np.random.default_rng(seed_words)
        starts = rng.integers(0, arr.size - self.context - 1, size=batch_size or self.batch_size)
        window = np.stack([arr[s : s + self.context + 1] for s in starts]).astype(np.int64)
        w = torch.from_numpy(window)
        return w[:, :-1], w[:, 1:]

    def train_batch(self, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch("train", [seed, step])

    def probe_batch(self, batch_size: int) -> torch.Tensor:
        """The fixed held-out batch every metric is measured on (the same for every run)."""
        return self.batch("val", [FIXED_STREAM, 0], batch_size)[0]

    def val_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.batch("val", [FIXED_STREAM, 1, i]) for i in range(n)]
