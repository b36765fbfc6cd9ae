"""Data: the embedded corpus, local files through `datasets`, the shared token cache, batches."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from ofe.config import DataConfig
from ofe.core.data import EOS_BYTE, TokenData, prepare, stdlib_dataset


def test_stdlib_corpus_is_the_standard_library_source():
    ds = stdlib_dataset()
    paths = ds["path"]
    assert "os.py" in paths and "json/decoder.py" in paths
    assert not any("site-packages" in p for p in paths)
    root = Path(sysconfig.get_paths()["stdlib"])
    i = paths.index("os.py")
    assert ds[i]["text"] == (root / "os.py").read_text(encoding="utf-8", errors="replace")


def test_prepared_cache_is_byte_tokens_split_by_file(data_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["vocab_size"] == 256 and meta["dtype"] == "uint8"
    train = np.fromfile(data_dir / "train.bin", dtype=np.uint8)
    val = np.fromfile(data_dir / "val.bin", dtype=np.uint8)
    assert train.size == meta["tokens"]["train"] and val.size == meta["tokens"]["val"]
    # documents end with EOS, so their count is the number of EOS bytes
    assert (train == EOS_BYTE).sum() == meta["documents"]["train"]
    assert (val == EOS_BYTE).sum() == meta["documents"]["val"]
    assert meta["documents"]["train"] + meta["documents"]["val"] == 120
    assert bytes(train[:200]).decode("utf-8", errors="replace").isprintable() or b"\n" in bytes(train[:200])


def test_split_is_deterministic(tmp_path, data_dir):
    prepare(DataConfig(max_documents=120), tmp_path)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / name).read_bytes() == (data_dir / name).read_bytes()


def test_local_files_through_datasets(tmp_path):
    docs = [{"text": f"def f{i}():\n    return {i}\n", "id": i} for i in range(200)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs))
    cfg = DataConfig(source="datasets", path="json", data_files=str(path), text_column="text")
    meta = prepare(cfg, tmp_path / "cache")
    assert meta["documents"]["train"] + meta["documents"]["val"] == 200
    assert meta["documents"]["val"] > 0
    text = (tmp_path / "cache" / "train.bin").read_bytes().split(b"\0")
    assert all(t.startswith(b"def f") for t in text if t)


def test_wrong_text_column_names_the_columns(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"content": "x = 1"}\n')
    cfg = DataConfig(source="datasets", path="json", data_files=str(path), text_column="text")
    with pytest.raises(ValueError, match=r"columns are \['content'\]"):
        prepare(cfg, tmp_path / "cache")


def test_batches_are_a_pure_function_of_seed_and_step(data_dir):
    data = TokenData(data_dir, context=16, batch_size=3)
    x1, y1 = data.train_batch(seed=0, step=5)
    x2, _ = data.train_batch(seed=0, step=5)
    x3, _ = data.train_batch(seed=0, step=6)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert x1.shape == (3, 16) and x1.dtype == torch.int64
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
    assert torch.equal(data.probe_batch(5), TokenData(data_dir, 16, 3).probe_batch(5))
    assert data.probe_batch(5).shape == (5, 16)


def test_missing_cache_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="ofe prepare"):
        TokenData(tmp_path, 16, 2)
