"""benchmarks/throughput.py, which the GPU self-check imports: its FLOP count against a hand count, its
token cache read by the Trainer's data loader, and `measure` end to end on CPU (no timing asserted)."""

from __future__ import annotations

import importlib.util

import numpy as np

from ofe.config import ModelConfig
from ofe.core.data import TokenData
from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(throughput)


def test_flops_per_token_at_130m_is_the_hand_count():
    """12 blocks of qkv 3d^2 + proj d^2 + fc 4d^2 + proj 4d^2, the head V d (tied: counted once), no
    positions; attention 12 L T d. At vocab 52,000 the head is 31% of the FLOPs (the issue's "about 30%")."""
    d, L, T, V = 768, 12, 128, 52_000
    cfg = ModelConfig(n_layer=L, d_model=d, n_head=12, context=T, vocab_size=V)
    n = L * 12 * d * d + V * d
    assert throughput.flops_per_token(cfg) == 6 * n + 12 * L * T * d == 763_379_712
    assert 0.30 < 6 * V * d / throughput.flops_per_token(cfg) < 0.32


def test_random_token_cache_is_read_by_token_data(tmp_path):
    for vocab in (256, 52_000):
        out = throughput.write_random_tokens(tmp_path / str(vocab), vocab, tokens=10_000)
        data = TokenData(out, context=16, batch_size=4)
        assert data.meta["vocab_size"] == vocab
        x, y = data.train_batch(0, 0)
        assert x.shape == (4, 16) and int(x.max()) < vocab and int(x.min()) >= 0
        assert np.unique(data.splits["train"]).size > min(vocab, 10_000) // 2  # spread over the vocabulary


def test_measure_runs_both_loops_on_cpu(tmp_path):
    r = throughput.measure("tiny", "cpu", steps=3, repeats=1, warmup=1, peak_tflops=1.0, workdir=tmp_path,
                           log=False)
    assert (r["device"], r["dtype"], r["vocab"], r["target"]) == ("cpu", "float32", 256, 0.97)
    assert r["tokens_per_step"] == 16 * 128
    assert r["ratio"] == r["trainer_tok_s"] / r["bare_tok_s"] > 0
    assert r["bare_mfu"] == r["bare_tok_s"] * r["flops_per_token"] / 1e12
    assert len(r["seconds"]["bare"]) == len(r["seconds"]["trainer"]) == 1
    assert not any(p.name.startswith(("run", "warmup")) for p in tmp_path.iterdir())  # run folders removed
