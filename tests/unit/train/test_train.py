"""Training: resume equals an uninterrupted run, divergence is a result, outputs are complete."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from ofe.config import run_identity
from ofe.io import read_metadata
from ofe.train import checkpoint, parallel
from ofe.train import trainer as train_mod
from ofe.train.parallel import DeviceError
from ofe.train.trainer import train
from tests.helpers import REPO
from tests.helpers.runs import Killed, kill_after, tiny_run


def _metrics(path) -> pd.DataFrame:
    return pd.read_parquet(path / "metrics.parquet")


def test_run_writes_metrics_summary_and_checkpoint(data_dir, tmp_path):
    cfg = tiny_run(data_dir)
    summary = train(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["steps_done"] == 12
    df = _metrics(tmp_path)
    # every logging step (0, 4, 8, 12) has every metric at every residual-stream site
    k = df[df.metric == "kurtosis"]
    assert sorted(k.step.unique()) == [0, 4, 8, 12]
    assert set(zip(k.layer, k.site)) == {(0, "block_input"), (1, "block_input"),
                                         (2, "unembed_input_pre_norm"), (2, "unembed_input")}
    assert set(df.metric) >= {"kurtosis", "rms_sq_variance_centred", "max_median_ratio",
                              "token_correlation", "rms", "attention_entropy", "loss", "lr", "grad_norm"}
    assert (k.value >= 1 - 1e-6).all() and (k.value <= 32 + 1e-6).all()  # Kurt lies in [1, d]
    assert len(df[(df.site == "train") & (df.metric == "loss")]) == 12
    assert (df.tokens == df.step * 4 * 32).all()
    meta = read_metadata(tmp_path / "metrics.parquet")
    assert meta["config"]["model"]["d_model"] == 32
    assert set(meta["provenance"]) >= {"git", "libraries", "date", "machine"}
    assert meta["provenance"]["libraries"]["torch"].startswith("2.")
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 12
    # a finished run is idempotent: calling again returns the summary without training
    mtime = (tmp_path / "metrics.parquet").stat().st_mtime_ns
    assert train(cfg, tmp_path)["status"] == "completed"
    assert (tmp_path / "metrics.parquet").stat().st_mtime_ns == mtime


def test_probe_before_and_after_final_norm(data_dir, tmp_path):
    with_norm = _metrics_of(data_dir, tmp_path / "a", model={"final_norm": "layernorm"})
    without = _metrics_of(data_dir, tmp_path / "b", model={"final_norm": "none"})

    def last(df, site):
        r = df[(df.site == site) & (df.metric == "rms") & (df.step == 0)]
        return r.value.item()

    assert last(without, "unembed_input") == pytest.approx(last(without, "unembed_input_pre_norm"))
    assert last(with_norm, "unembed_input") == pytest.approx(1.0, abs=0.05)  # LN output at init
    assert last(with_norm, "unembed_input") != pytest.approx(last(with_norm, "unembed_input_pre_norm"))


def _metrics_of(data_dir, out, **sections):
    train(tiny_run(data_dir, train={"steps": 1}, **sections), out)
    return _metrics(out)


def test_interrupted_run_resumes_to_identical_metrics(data_dir, tmp_path):
    cfg = tiny_run(data_dir)
    train(cfg, tmp_path / "straight")
    with pytest.raises(Killed):
        train(cfg, tmp_path / "resumed", on_checkpoint=[kill_after(8)])
    assert not (tmp_path / "resumed" / "summary.json").exists()
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 8
    train(cfg, tmp_path / "resumed")
    pd.testing.assert_frame_equal(_metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed"))


@pytest.mark.slow  # starts a training process, killed and restarted
def test_killed_process_resumes_to_identical_metrics(data_dir, tmp_path):
    """SIGKILL a real `python -m ofe train` after its first checkpoint, start it again."""
    cfg = tiny_run(data_dir, train={"steps": 40, "checkpoint_every": 5, "log_every": 5})
    (tmp_path / "run.json").write_text(cfg.to_json())
    train(cfg, tmp_path / "straight")
    cmd = [sys.executable, "-m", "ofe", "train", "--config", str(tmp_path / "run.json"), "--out",
           str(tmp_path / "killed")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (tmp_path / "killed" / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "summary.json").exists(), "killed too late to test resume"
    step = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step < 40
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    pd.testing.assert_frame_equal(_metrics(tmp_path / "straight"), _metrics(tmp_path / "killed"))


def test_absurd_lr_diverges_and_is_recorded(data_dir, tmp_path):
    cfg = tiny_run(data_dir, optim={"lr": 1e6, "warmup_frac": 0.0, "clip": None},
                   model={"norm": "none", "final_norm": "none"}, train={"steps": 50})
    summary = train(cfg, tmp_path)
    assert summary["status"] == "diverged"
    assert summary["steps_done"] < 50
    assert summary["final_train_loss"] is None and summary["final_val_loss"] is None
    reject = lambda c: pytest.fail(f"summary.json holds {c}, which strict JSON parsers reject")  # noqa: E731
    saved = json.loads((tmp_path / "summary.json").read_text(), parse_constant=reject)
    assert saved["status"] == "diverged"
    assert saved["final_train_loss"] is None and saved["final_val_loss"] is None
    df = _metrics(tmp_path)
    losses = df[(df.site == "train") & (df.metric == "loss")].value
    assert not math.isfinite(losses.iloc[-1])  # the diverging step is logged, then the run stops
    assert read_metadata(tmp_path / "metrics.parquet")["status"] == "diverged"


def test_vocab_mismatch_is_a_clear_error(data_dir, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train(tiny_run(data_dir, model={"vocab_size": 100}), tmp_path)


def test_cpu_default_is_fp32_and_bf16_autocast_is_an_option(data_dir, tmp_path):
    fp32 = train(tiny_run(data_dir, train={"steps": 4}), tmp_path / "fp32")
    cpu = {"device": "cpu", "device_type": "cpu", "dtype": "float32", "gpu_name": None}
    assert (fp32["device"], fp32["device_type"], fp32["precision"], fp32["gpu_name"]) == ("cpu", "cpu", "float32", None)
    assert read_metadata(tmp_path / "fp32" / "metrics.parquet")["runtime"] == cpu
    bf16 = train(tiny_run(data_dir, train={"steps": 4, "precision": "bf16"}), tmp_path / "bf16")
    assert bf16["precision"] == "bfloat16" and bf16["status"] == "completed"
    assert read_metadata(tmp_path / "bf16" / "metrics.parquet")["runtime"] == cpu | {"dtype": "bfloat16"}
    a, b = (pd.read_parquet(tmp_path / d / "metrics.parquet") for d in ("fp32", "bf16"))
    ka, kb = (df[df.metric == "kurtosis"].value.to_numpy() for df in (a, b))
    assert abs(ka - kb).max() < 0.05 * ka.max()  # close, not equal: bf16 activations, fp32 metrics
    assert bf16["peak_rss_mb"] > 0


def test_a_job_given_gpus_it_cannot_use_fails_before_writing_anything(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # e.g. a CPU-only torch wheel
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "1")
    with pytest.raises(DeviceError, match=r"given GPUs \(SLURM_GPUS_ON_NODE=1\) but torch cannot use CUDA"):
        train(tiny_run(data_dir, train={"device": "auto"}), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # not a CPU run in its place


def test_a_cpu_run_is_neither_finished_nor_resumed_on_a_gpu(data_dir, tmp_path, monkeypatch):
    """The same config (device auto, precision auto) on a CUDA host is another run: CUDA bf16."""
    cfg = tiny_run(data_dir, train={"device": "auto"})
    train(cfg, tmp_path / "done")
    with pytest.raises(Killed):
        train(cfg, tmp_path / "half", on_checkpoint=[kill_after(4)])
    cpu_id = json.loads((tmp_path / "done" / "summary.json").read_text())["config_hash"]
    assert cpu_id == cfg.config_hash()  # CPU fp32: the config hash, as before the identity held the device

    class Built(Exception):
        """The trainer was about to be built: the run was not taken for finished."""

    def trainer(c, out, on_checkpoint=()):
        raise Built(out)

    monkeypatch.setattr(train_mod, "Trainer", trainer)
    # on CPU it is finished: the summary comes back and nothing trains
    assert train(cfg, tmp_path / "done") == json.loads((tmp_path / "done" / "summary.json").read_text())
    # the same config on a CUDA host: 'auto' resolves to cuda:0, so bf16 (no trainer is built: no GPU here)
    monkeypatch.setattr(parallel, "resolve_device", lambda name, local_rank=0: torch.device("cuda", 0))
    with pytest.raises(Built):
        train(cfg, tmp_path / "done")  # the CPU summary is no answer there
    gpu_id = train_mod.identity(cfg, torch.device("cuda", 0), torch.bfloat16)
    assert gpu_id == run_identity(cfg.to_dict(), "cuda", "bfloat16") != cpu_id
    # and what the trainer would find: the CPU checkpoint and outputs are moved aside, never resumed
    for run in ("done", "half"):
        assert checkpoint.prepare_run_dir(tmp_path / run, gpu_id) is None  # start fresh
        left = {p.name for p in (tmp_path / run).iterdir()}
        assert not left & {"checkpoint.pt", "checkpoint.prev.pt", "summary.json", "metrics.parquet"}
        assert any((tmp_path / run / "stale").rglob("checkpoint.pt"))
