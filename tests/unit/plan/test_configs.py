"""The study sets under configs/: each validates and plans (CI runs none of them), the GPU study is the
paper's 130M recipe, and naming a config file on the command line replaces config.yaml's grid."""

from __future__ import annotations

import typing

from pathlib import Path

import pytest

from ofe.config import config_hash
from ofe.plan import plan_from_config
from ofe.plan.grid import load_config
from tests.helpers import REPO
from tests.helpers.workflow import job_counts, snakemake

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _plan(path: Path) -> dict:
    return plan_from_config(load_config(path), SCHEMA, data_root=Path("/nonexistent"))


def _pairs(plan: dict, **where) -> dict[tuple[str, str], set[int]]:
    """(block, optimizer) -> seeds, over the runs whose grid matches `where`."""
    out: dict[tuple[str, str], set[int]] = {}
    for run in plan["runs"]:
        grid = run["grid"]
        if all(grid.get(k) == v for k, v in where.items()):
            out.setdefault((grid["block"], grid["optimizer"]), set()).add(grid["seed"])
    return out


def test_there_are_study_sets() -> None:
    assert {p.name for p in CONFIGS} >= {"paper-int8.yaml", "paper-130m.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.usefixtures("hub_online")  # configs/pythia.yaml names hub models: online, not cached here is fine
def test_each_config_validates_and_plans(path: Path) -> None:
    plan = _plan(path)
    assert plan["runs"] or plan["checkpoints"], f"{path.name} plans no run and no checkpoint"
    assert len({r["run_id"] for r in plan["runs"]}) == len(plan["runs"])
    assert plan["config"]["results_dir"] != "results"  # never mixes its runs with the default grid's
    assert plan["config"]["report"] != "reports/index.html"


@pytest.mark.usefixtures("hub_online")  # its hub tokenizer is not cached here
def test_gpu_study_is_the_papers_130m_recipe() -> None:
    plan = _plan(REPO / "configs" / "paper-130m.yaml")
    assert _pairs(plan) == {(b, o): {0, 1, 2} for b in ("pre_ln", "op") for o in ("adamw", "soap")}
    for run in plan["runs"]:
        model, optim, train = (run["config"][k] for k in ("model", "optim", "train"))
        # the public code's 130M CodeParrot model and recipe (simplified_transformers: run_clm.py,
        # config/train/train.yaml): 12 x 768, 12 heads, context 128, 128 sequences per step, AdamW
        # (0.9, 0.999), eps 1e-8, lr 1e-3, weight decay 0.1, 5% warmup, linear decay, clip 1
        assert (model["n_layer"], model["d_model"], model["n_head"], model["context"]) == (12, 768, 12, 128)
        assert train["batch_size"] == 128 and model["vocab_size"] >= 52000
        assert (optim["lr"], tuple(optim["betas"]), optim["eps"], optim["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-8, 0.1)
        assert (optim["warmup_frac"], optim["decay"], optim["min_lr_frac"], optim["clip"]) == (0.05, "linear", 0.0, 1.0)
        assert model["beta"] == (0.2 if run["grid"]["block"] == "op" else 1.0)
    assert list(plan["quant"]["protocols"]) == ["static_per_tensor", "dynamic_per_token"] and 8 in plan["quant"]["bits"]


def test_naming_a_config_file_replaces_the_default_grid(tmp_path: Path) -> None:
    # a workdir whose own config.yaml has a study of its own: it must not be merged in
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    paper = REPO / "configs" / "paper-int8.yaml"
    out = snakemake(tmp_path, "-n", "--configfile", str(paper))
    assert out.returncode == 0, out.stderr
    assert job_counts(out.stdout + out.stderr)["train"] == len(_plan(paper)["runs"])
    assert f"{len(_plan(paper)['runs'])} runs" in out.stderr
    out = snakemake(tmp_path, "-n")
    assert job_counts(out.stdout + out.stderr)["train"] == len(_plan(REPO / "config.yaml")["runs"])


def test_cpu_study_compares_pre_ln_adamw_with_op_soap_over_length_width_and_seeds() -> None:
    plan = _plan(REPO / "configs" / "paper-int8.yaml")
    shape: dict[tuple[str, str], set[tuple[int, int, int]]] = {}
    for run in plan["runs"]:
        cfg = run["config"]
        key = (run["grid"]["block"], run["grid"]["optimizer"])
        shape.setdefault(key, set()).add((cfg["model"]["d_model"], cfg["train"]["steps"], cfg["train"]["seed"]))
    assert set(shape) == {("pre_ln", "adamw"), ("op", "soap")}

    def seeds(key: tuple[str, str], d: int, steps: int) -> set[int]:
        return {seed for d_, s, seed in shape[key] if (d_, s) == (d, steps)}

    for key in shape:  # training length and width, each configuration
        assert {(d, s) for d, s, _ in shape[key]} >= {(128, 300), (128, 1000), (128, 3000), (256, 300)}
        assert seeds(key, 256, 300) == {0, 1, 2}
    # the headline: equal steps, and OP + SOAP also at fewer steps (matched validation loss)
    assert seeds(("pre_ln", "adamw"), 128, 3000) == seeds(("op", "soap"), 128, 3000) == {0, 1, 2}
    assert seeds(("op", "soap"), 128, 1000) == {0, 1, 2}
    assert all(run["config"]["optim"]["lr"] == 1e-2 for run in plan["runs"])  # one LR: the default grid's
    # the real int8 kernels beside the simulation, here and nowhere by default (config.yaml: opt-in)
    assert plan["quant"]["protocols"] == ("static_per_tensor", "dynamic_per_token", "torchao_dynamic")


def test_osp_study_crosses_its_blocks_with_adamw_and_muon_at_the_default_grids_settings() -> None:
    """configs/osp.yaml: OSP's ladder (Pre-LN + AdamW, + Muon, + single-scale RMSNorm, + the embedding
    projection) inside a 4 x 2 grid, two seeds, at the default grid's CPU settings."""
    plan = _plan(REPO / "configs" / "osp.yaml")
    blocks = ("pre_ln", "pre_rms", "pre_ssnorm", "osp")
    assert _pairs(plan) == {(b, o): {0, 1} for b in blocks for o in ("adamw", "muon")}
    default = {r["run_id"]: config_hash(r["config"]) for r in _plan(REPO / "config.yaml")["runs"]}
    for run in plan["runs"]:
        model, grid = run["config"]["model"], run["grid"]
        assert (model["n_layer"], model["d_model"]) == (4, 128) and run["config"]["train"]["steps"] == 300
        assert run["config"]["optim"]["name"] == grid["optimizer"]
        single = grid["block"] in ("pre_ssnorm", "osp")
        assert (model["norm"] == model["final_norm"] == "single_scale") == single
        assert model["embed_proj"] == (grid["block"] == "osp")
        if run["run_id"] in default:  # the baselines are the default grid's own runs, config for config
            assert config_hash(run["config"]) == default[run["run_id"]]
    assert {"tiny/pre_ln/beta1/adamw/lr0.01/seed0", "tiny/pre_ln/beta1/muon/lr0.01/seed0"} <= set(default)


def test_attention_study_crosses_every_variant_with_pre_ln_and_op() -> None:
    """configs/attention.yaml: the seven attention variants x {Pre-LN, OP} x two seeds at the default grid's
    CPU settings; its softmax runs are the default grid's own, config for config."""
    from ofe.config.run import AttentionKind

    plan = _plan(REPO / "configs" / "attention.yaml")
    variants = set(typing.get_args(AttentionKind))
    got = {(r["grid"]["block"], r["config"]["model"]["attention"], r["grid"]["seed"]) for r in plan["runs"]}
    assert got == {(b, v, s) for b in ("pre_ln", "op") for v in variants for s in (0, 1)}
    default = {r["run_id"]: config_hash(r["config"]) for r in _plan(REPO / "config.yaml")["runs"]}
    softmax = [r for r in plan["runs"] if r["config"]["model"]["attention"] == "softmax"]
    assert softmax and all(config_hash(r["config"]) == default[r["run_id"]] for r in softmax
                           if r["run_id"] in default)
    assert any(r["run_id"] in default for r in softmax)


@pytest.mark.usefixtures("hub_online")
def test_pythia_study_inspects_every_listed_checkpoint_and_trains_nothing() -> None:
    """configs/pythia.yaml: the paper's Figure 1 view over two Pythia sizes, one job per revision, each
    at the step its revision names (planned offline: nothing is looked up on the hub)."""
    plan = _plan(REPO / "configs" / "pythia.yaml")
    assert plan["runs"] == []
    got = [(c["model"], c["revision"], c["step"]) for c in plan["checkpoints"]]
    steps = [0, 1000, 4000, 16000, 64000, 143000]
    assert got == [(f"EleutherAI/pythia-{size}", f"step{s}", s) for size in ("160m", "410m") for s in steps]
    assert plan["inspect"]["mem_gb"] == 32 and plan["studies"][0]["kind"] == "checkpoints"
