"""The run folder survives what happens to real jobs: a folder reused by another config, a torn checkpoint,
a crash just before the summary, non-finite gradients, NaN in a summary."""

from __future__ import annotations

import io
import json
import math
import os
import stat

import pandas as pd
import pytest
import torch

from ofe.config import ModelConfig, OptimConfig
from ofe.core.model import GPT
from ofe.core.optim import OPTIMIZERS, build_optimizer
from ofe.io import atomic_write_json, atomic_write_text, write_parquet
from ofe.train.trainer import Trainer, train
from tests.helpers.runs import Killed, kill_after, tiny_run

KEY = ["step", "layer", "site", "metric"]


def _metrics(path) -> pd.DataFrame:
    return pd.read_parquet(path / "metrics.parquet")


def _losses(rows) -> dict[int, float]:
    return {r[0]: r[5] for r in rows if r[3] == "train" and r[4] == "loss"}


def _stale(run) -> list:
    """The folders outputs were moved aside into (one per start that moved something)."""
    return sorted((run / "stale").iterdir()) if (run / "stale").exists() else []


def _config_a(data_dir):
    return tiny_run(data_dir)


def _config_b(data_dir):
    return tiny_run(data_dir, optim={"lr": 1e-2})


@pytest.fixture(scope="module")
def straight_a(data_dir, tmp_path_factory) -> pd.DataFrame:
    """Config A's metrics from one uninterrupted run in a folder of its own."""
    out = tmp_path_factory.mktemp("straight_a")
    train(_config_a(data_dir), out)
    return _metrics(out)


@pytest.fixture(scope="module")
def fresh_b(data_dir, tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("fresh_b")
    train(_config_b(data_dir), out)
    return _metrics(out)


# ---- run identity -------------------------------------------------------------------------------
@pytest.mark.parametrize("a_left", ["checkpoint", "finished run"])
def test_another_configs_outputs_are_moved_aside_and_training_starts_fresh(
        data_dir, tmp_path, capsys, fresh_b, a_left):
    a, b = _config_a(data_dir), _config_b(data_dir)
    assert a.config_hash() != b.config_hash()
    run = tmp_path / "run"
    if a_left == "checkpoint":
        with pytest.raises(Killed):
            train(a, run, on_checkpoint=[kill_after(8)])
        expected_aside = {"checkpoint.pt", "checkpoint.prev.pt"}
    else:  # a finished run of A: its early return must not answer for B
        train(a, run)
        write_parquet(pd.DataFrame({"bits": [8]}), run / "quant.parquet", metadata={"config": a.to_dict()})
        expected_aside = {"checkpoint.pt", "checkpoint.prev.pt", "metrics.parquet", "summary.json", "quant.parquet"}
    a_rows = torch.load(run / "checkpoint.pt", weights_only=True)["rows"]
    capsys.readouterr()

    summary = train(b, run)

    log = capsys.readouterr().out
    assert summary["status"] == "completed" and summary["config"]["optim"]["lr"] == 1e-2
    pd.testing.assert_frame_equal(_metrics(run), fresh_b)
    b_loss = _losses(_metrics(run).itertuples(index=False))
    a_loss = _losses(a_rows)
    assert all(b_loss[s] != a_loss[s] for s in a_loss if s > 0)  # B really is another run
    (aside,) = _stale(run)
    assert {p.name for p in aside.iterdir()} == expected_aside
    moved = torch.load(aside / "checkpoint.pt", weights_only=True)
    assert moved["config_hash"] == a.config_hash() and moved["rows"] == a_rows
    assert (f"[ofe] checkpoint.pt belongs to config {a.config_hash()}, this run is {b.config_hash()}: "
            f"moved to stale/{aside.name}; starting fresh") in log
    for name in expected_aside - {"checkpoint.pt", "checkpoint.prev.pt"}:  # each output moved says so
        assert (f"[ofe] {name} belongs to config {a.config_hash()}, this run is {b.config_hash()}: "
                f"moved to stale/{aside.name}\n") in log, name
    assert torch.load(run / "checkpoint.pt", weights_only=True)["config_hash"] == b.config_hash()
    assert json.loads((run / "summary.json").read_text())["config_hash"] == b.config_hash()


def test_checkpoint_without_a_config_hash_is_moved_aside(data_dir, tmp_path, capsys, straight_a):
    cfg = _config_a(data_dir)
    with pytest.raises(Killed):
        train(cfg, tmp_path, on_checkpoint=[kill_after(8)])
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):  # as an older ofe wrote them
        ck = torch.load(tmp_path / name, weights_only=True)
        del ck["config_hash"]
        torch.save(ck, tmp_path / name)
    capsys.readouterr()
    train(cfg, tmp_path)
    log = capsys.readouterr().out
    assert "checkpoint.pt records no config hash" in log and "starting fresh" in log
    assert "resumed" not in log
    (aside,) = _stale(tmp_path)
    assert {p.name for p in aside.iterdir()} == {"checkpoint.pt", "checkpoint.prev.pt"}
    pd.testing.assert_frame_equal(_metrics(tmp_path), straight_a)


# ---- durable checkpoints -------------------------------------------------------------------------
def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_checkpoint_falls_back_to_the_previous_one(data_dir, tmp_path, capsys, straight_a):
    cfg = _config_a(data_dir)
    with pytest.raises(Killed):
        train(cfg, tmp_path, on_checkpoint=[kill_after(8)])
    assert torch.load(tmp_path / "checkpoint.prev.pt", weights_only=True)["step"] == 4
    _truncate(tmp_path / "checkpoint.pt")
    capsys.readouterr()
    train(cfg, tmp_path)
    log = capsys.readouterr().out
    assert "checkpoint.pt is unreadable" in log and "resuming from checkpoint.prev.pt" in log
    assert f"resumed {tmp_path} at step 4" in log
    pd.testing.assert_frame_equal(_metrics(tmp_path), straight_a)
    (aside,) = _stale(tmp_path)
    assert [p.name for p in aside.iterdir()] == ["checkpoint.pt"]  # kept for a post-mortem


def test_both_checkpoints_unreadable_start_fresh(data_dir, tmp_path, capsys, straight_a):
    cfg = _config_a(data_dir)
    with pytest.raises(Killed):
        train(cfg, tmp_path, on_checkpoint=[kill_after(8)])
    _truncate(tmp_path / "checkpoint.pt")
    (tmp_path / "checkpoint.prev.pt").write_bytes(b"")
    capsys.readouterr()
    train(cfg, tmp_path)
    log = capsys.readouterr().out
    assert log.count("is unreadable") == 2 and log.count("starting fresh") == 2
    pd.testing.assert_frame_equal(_metrics(tmp_path), straight_a)
    (aside,) = _stale(tmp_path)
    assert {p.name for p in aside.iterdir()} == {"checkpoint.pt", "checkpoint.prev.pt"}


def test_temp_files_left_by_a_hard_kill_are_removed_at_start(data_dir, tmp_path):
    left = [".checkpoint.pt.k2j3h4ab.tmp", ".checkpoint.prev.pt.9a8b7c6d.tmp", ".metrics.parquet.x9y8z7w6.tmp",
            ".summary.json.q1w2e3r4.tmp", ".quant.parquet.zz11yy22.tmp"]
    for name in left:
        (tmp_path / name).write_bytes(b"half a file")
    # the launcher's own file: its head process may be writing it while the job starts
    (tmp_path / ".job.json.a1b2c3d4.tmp").write_text("{")
    Trainer(tiny_run(data_dir), tmp_path)
    assert [name for name in left if (tmp_path / name).exists()] == []
    assert (tmp_path / ".job.json.a1b2c3d4.tmp").exists()


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", "dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", "file", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_text(tmp_path / "x.txt", "hello")
    ino = (tmp_path / "x.txt").stat().st_ino
    assert events == [("fsync", "file", ino), ("replace", "file", ino), ("fsync", "dir", tmp_path.stat().st_ino)]
    assert (tmp_path / "x.txt").read_text() == "hello"


# ---- a crash between the final checkpoint and the summary ----------------------------------------
def test_crash_before_the_summary_never_duplicates_rows(data_dir, tmp_path, monkeypatch, straight_a):
    cfg = _config_a(data_dir)

    def killed(self):
        raise RuntimeError("killed before writing metrics and summary")

    with monkeypatch.context() as m:
        m.setattr(Trainer, "finish", killed)
        with pytest.raises(RuntimeError, match="killed"):
            train(cfg, tmp_path)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 12
    assert not (tmp_path / "summary.json").exists()
    summary = train(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["steps_done"] == 12
    df = _metrics(tmp_path)
    assert not df.duplicated(KEY).any(), df[df.duplicated(KEY, keep=False)]
    pd.testing.assert_frame_equal(df, straight_a)


# ---- non-finite gradients ------------------------------------------------------------------------
def _poison(trainer: Trainer, when) -> None:
    """Make one parameter's gradient infinite (the loss stays finite) at the steps `when` selects."""
    param = next(trainer.model.parameters())
    param.register_hook(lambda g: torch.full_like(g, math.inf) if when(trainer.state.step) else g)


def test_non_finite_gradient_skips_the_update(data_dir, tmp_path):
    trainer = Trainer(_config_a(data_dir), tmp_path)
    _poison(trainer, lambda step: step == 5)
    weights, real_step = {}, trainer.train_step

    def spy():
        before = [p.detach().clone() for p in trainer.model.parameters()]
        out = real_step()
        weights[trainer.state.step] = (before, [p.detach().clone() for p in trainer.model.parameters()])
        return out

    trainer.train_step = spy
    summary = trainer.run()
    unchanged = lambda step: all(torch.equal(x, y) for x, y in zip(*weights[step]))  # noqa: E731
    assert unchanged(5)
    assert not unchanged(4) and not unchanged(6)  # ordinary steps do update
    assert summary["status"] == "completed" and summary["steps_done"] == 12
    assert summary["skipped_steps"] == 1
    assert json.loads((tmp_path / "summary.json").read_text())["skipped_steps"] == 1
    norms = _metrics(tmp_path).query("site == 'train' and metric == 'grad_norm'").set_index("step").value
    assert norms[5] == math.inf and norms.drop(5).map(math.isfinite).all()


def test_ten_skipped_steps_in_a_row_are_a_divergence(data_dir, tmp_path):
    trainer = Trainer(tiny_run(data_dir, train={"steps": 20}), tmp_path)
    _poison(trainer, lambda step: step >= 3)
    summary = trainer.run()
    assert summary["status"] == "diverged"
    assert summary["skipped_steps"] == 10 and summary["steps_done"] == 12  # steps 3..12, the 10th stops it
    assert summary["final_train_loss"] is None and summary["final_val_loss"] is None


# ---- strict JSON ---------------------------------------------------------------------------------
def _strict(text: str):
    def reject(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=reject)


def test_summary_json_is_strict_json(tmp_path):
    atomic_write_json(tmp_path / "summary.json",
                      {"loss": math.nan, "curve": [1.5, math.inf, {"low": -math.inf}], "pair": (math.nan, 2),
                       "status": "diverged", "none": None})
    assert _strict((tmp_path / "summary.json").read_text()) == {
        "loss": None, "curve": [1.5, None, {"low": None}], "pair": [None, 2], "status": "diverged", "none": None}


# ---- checkpoints load to the CPU -----------------------------------------------------------------
def _steps(state, key=None) -> list:
    """Every `step` entry in an optimiser's state or param groups (nested dicts and lists)."""
    if isinstance(state, dict):
        return [s for k, v in state.items() for s in _steps(v, k)]
    if isinstance(state, (list, tuple)):
        return [s for v in state for s in _steps(v, key)]
    return [state] if key == "step" else []


def _tensors(state, key=None) -> list:
    """(key, tensor) for every tensor in an optimiser's state."""
    if isinstance(state, dict):
        return [t for k, v in state.items() for t in _tensors(v, k)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v, key)]
    return [(key, state)] if isinstance(state, torch.Tensor) else []


def _parts(opt) -> list:
    return list(opt.parts.values()) if hasattr(opt, "parts") else [opt]  # MuonWithAdamW: its two


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_loading_an_optimiser_moves_its_moments_to_the_parameters_and_keeps_step_on_the_cpu(name):
    """What a resume from a CPU-loaded checkpoint relies on, for every optimiser: load_state_dict copies
    the moments to the parameters' device and leaves `step` on the CPU, where reading it costs no
    device sync. The 'meta' device stands in for a GPU: any tensor left on the CPU would show."""
    cfg, ocfg = ModelConfig(n_layer=1, d_model=16, n_head=2, context=8), OptimConfig(name=name, lr=1e-3)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = build_optimizer(model, ocfg)
    for _ in range(3):  # SOAP's and rotated_adafactor's first step only builds their eigenbases
        x = torch.randint(0, cfg.vocab_size, (2, 8))
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    with torch.device("meta"):
        on_device = GPT(cfg)
    loaded = build_optimizer(on_device, ocfg)
    loaded.load_state_dict(torch.load(buffer, map_location="cpu", weights_only=True))
    state = [dict(part.state) for part in _parts(loaded)]
    groups = [part.param_groups for part in _parts(loaded)]
    moments = [t for k, t in _tensors(state) if k != "step"]
    assert moments and all(t.device.type == "meta" for t in moments)
    steps = _steps(state) + _steps(groups)  # SOAP counts steps in its param groups, as an int
    assert steps and all(isinstance(s, int) or s.device.type == "cpu" for s in steps)


@pytest.mark.parametrize("name,parallel", [(name, "ddp") for name in OPTIMIZERS] + [("adamw", "fsdp")])
def test_resume_loads_the_checkpoint_to_the_cpu(data_dir, tmp_path, monkeypatch, name, parallel):
    cfg = tiny_run(data_dir, optim={"name": name}, train={"parallel": parallel})
    with pytest.raises(Killed):
        train(cfg, tmp_path, on_checkpoint=[kill_after(4)])
    seen, real_load = [], torch.load

    def load(f, *args, **kwargs):  # ofe's own loads only (DCP reads its shards' bytes itself)
        if isinstance(f, (str, os.PathLike)):
            seen.append((os.path.basename(f), kwargs.get("map_location")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    trainer = Trainer(cfg, tmp_path)
    try:
        assert trainer.state.step == 4
        first = "state.pt" if parallel == "fsdp" else "checkpoint.pt"  # the fsdp folder's own state
        assert seen and seen[0][0] == first and all(m == "cpu" for _, m in seen), seen
        parts = _parts(trainer.opt)
        steps = _steps([dict(p.state) for p in parts]) + _steps([p.param_groups for p in parts])
        assert steps and all(isinstance(s, int) or s.device.type == "cpu" for s in steps)
    finally:
        trainer.procs.shutdown()
