"""Bad configuration fails early, naming the key and the allowed values; the grid expands as planned."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import time

import pytest
import yaml

import ofe.config.fields as fields_module
from ofe.__main__ import main
from ofe.config import (SUPPORTED_BITS, ConfigError, DataConfig, ModelConfig, OptimConfig, QuantConfig,
                        RunConfig, TrainConfig, build_section)
from ofe.plan import grid, presets
from ofe.plan import plan_from_config
from tests.helpers import REPO

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture
def config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_default_config_expands_to_the_union_of_its_studies(config):
    runs = grid.expand(config, SCHEMA)
    ids = list(runs)
    assert len(ids) == len(set(ids))
    shared = runs["tiny/op/beta0.2/adamw/lr0.01/seed0"]
    assert {"norms", "beta", "lr"} <= set(shared.studies)  # one run serves several studies
    assert shared.config.model.qk_norm == "rms" and shared.config.model.final_norm == "none"
    assert runs["tiny/pre_ln/beta1/adamw/lr0.003/seed0"].config.optim.lr == pytest.approx(3e-3)
    # every block of the paper; the opt-in ones have their own study configs (configs/osp.yaml)
    assert {r.grid["block"] for r in runs.values()} == set(presets.BLOCKS) - presets.OPT_IN_BLOCKS


def test_schema_enumerations_match_the_presets():
    schema = yaml.safe_load(SCHEMA.read_text())
    assert schema["$defs"]["block"]["enum"] == list(presets.BLOCKS)
    assert schema["$defs"]["scale"]["enum"] == list(presets.SCALES)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c["studies"]["norms"]["grid"].__setitem__("block", ["pre_lnn"]),
         ["studies.norms.grid.block[0]", "'pre_lnn' is not one of", "'pre_ln'", "'op'"]),
        (lambda c: c["studies"]["lr"]["grid"].__setitem__("lrr", [0.1]),
         ["studies.lr.grid: unknown key 'lrr'", "allowed keys are", "'lr'", "optim.eps"]),
        (lambda c: c["defaults"].__setitem__("scale", "huge"),
         ["defaults.scale", "'huge' is not one of", "'tiny'"]),
        (lambda c: c["defaults"].__setitem__("lr", "1e-2x"),
         ["defaults.lr", "'1e-2x' is not of type 'number'"]),
        (lambda c: c["defaults"]["optim"].__setitem__("decay", "cosinus"),
         ["optim.decay", "'cosinus'", "'cosine'", "'linear'"]),
        (lambda c: c["defaults"]["model"if "model" in c["defaults"] else "train"].__setitem__("stepz", 3),
         ["stepz", "unknown key", "'steps'"]),
        (lambda c: c["studies"]["beta"]["grid"].__setitem__("optim.epz", [1e-8]),
         ["optim.epz", "sweepable keys", "optim.eps"]),
    ],
)
def test_bad_config_is_rejected_with_key_and_allowed_values(config, mutate, expected):
    bad = copy.deepcopy(config)
    mutate(bad)
    with pytest.raises(ConfigError) as err:
        grid.expand(bad, SCHEMA)
    for fragment in expected:
        assert fragment in str(err.value)


def test_dataclass_validation_names_field_and_choices():
    with pytest.raises(ConfigError, match=r"model.norm: 'batchnorm' is not allowed; choose one of \['layernorm'"):
        ModelConfig(norm="batchnorm")
    with pytest.raises(ConfigError, match="model.d_model: 30 is not divisible by n_head=4"):
        ModelConfig(d_model=30, n_head=4)
    with pytest.raises(ConfigError, match="optim.lr: must be > 0"):
        OptimConfig(lr=0)


def test_run_config_round_trips_through_json():
    cfg = RunConfig(model=ModelConfig(norm="srms", logit_cap=30.0), grid={"block": "x"})
    import json

    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_extra_axis_joins_the_run_path_only_where_it_changes_the_run(config):
    config["studies"] = {"norms": {"grid": {"block": ["pre_ln", "op"]}},
                         "eps": {"grid": {"block": ["pre_ln"], "optim.eps": [1.0e-8, 1.0e-4]}}}
    runs = grid.expand(config, SCHEMA)
    assert len(runs) == 3
    base = runs["tiny/pre_ln/beta1/adamw/lr0.01/seed0"]  # eps 1e-8 is the default: the same run
    assert base.studies == ["norms", "eps"]
    assert runs["tiny/pre_ln/beta1/adamw/lr0.01/seed0_optim.eps0.0001"].config.optim.eps == 1e-4
    # every run carries the extra column, with the value its config has
    assert {r.grid["optim.eps"] for r in runs.values()} == {1e-8, 1e-4}


def test_check_config_cli_exits_2_with_the_message(tmp_path, config):
    config["studies"]["norms"]["grid"]["block"] = ["pre_ln", "opp"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "ofe", "check-config", str(path), "--schema", str(SCHEMA)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert "studies.norms.grid.block[1]: 'opp' is not one of" in out.stderr


# ---- types and ranges (ofe/config/run.py), each message naming the key and what is allowed ----------------

def expand_error(config: dict) -> str:
    with pytest.raises(ConfigError) as err:
        grid.expand(config, SCHEMA)
    return str(err.value)


@pytest.mark.parametrize(
    "section, name, value, expected",
    [
        ("optim", "betas", [0.9, 1.5], ["defaults.optim.betas[1]", "[0, 1)", "1.5"]),
        ("optim", "betas", [0.9], ["defaults.optim.betas", "2 numbers"]),
        ("optim", "betas", [-0.1, 0.9], ["defaults.optim.betas[0]", "[0, 1)"]),
        ("optim", "eps", 0.0, ["defaults.optim.eps", "> 0"]),
        ("optim", "weight_decay", -0.1, ["defaults.optim.weight_decay", ">= 0"]),
        ("optim", "clip", 0, ["defaults.optim.clip", "> 0", "null"]),
        ("optim", "min_lr_frac", 1.5, ["defaults.optim.min_lr_frac", "[0, 1]"]),
        ("optim", "warmup_frac", 1.0, ["defaults.optim.warmup_frac", "[0, 1)"]),
        ("optim", "eps", float("inf"), ["defaults.optim.eps", "finite"]),
        ("optim", "weight_decay", float("nan"), ["defaults.optim.weight_decay", "finite"]),
        ("model", "beta", 0.0, ["defaults.model.beta", "> 0"]),
        ("model", "init_std", -0.02, ["defaults.model.init_std", "> 0"]),
        ("model", "embed_init_std", 0, ["defaults.model.embed_init_std", "> 0"]),
        ("model", "n_head", ["four"], ["defaults.model.n_head", "integer", "['four']"]),
        ("model", "beta_trainable", "yes", ["defaults.model.beta_trainable", "true or false"]),
        ("model", "vocab_size", 100, ["defaults.model.vocab_size", "256"]),
        ("train", "steps", 300.5, ["defaults.train.steps", "integer", "300.5"]),
        ("train", "steps", True, ["defaults.train.steps", "integer"]),
        ("train", "steps", "3e2", ["defaults.train.steps", "integer", "'3e2'"]),
        ("train", "threads", 0, ["defaults.train.threads", "> 0"]),
        ("train", "device", "gpu", ["defaults.train.device", "'auto'", "'cpu'", "'cuda'", "cuda:N"]),
        ("train", "compile", 1, ["defaults.train.compile", "true or false"]),
        ("train", "precision", "fp16", ["defaults.train.precision", "'fp32'", "'bf16'"]),
    ],
)
def test_defaults_sections_are_typed_and_range_checked_by_key(config, section, name, value, expected):
    config["defaults"].setdefault(section, {})[name] = value
    message = expand_error(config)
    for fragment in expected:
        assert fragment in message


def test_dataclass_messages_name_field_and_range():
    with pytest.raises(ConfigError, match=r"^optim\.betas\[1\]: must be in \[0, 1\), got 1\.5$"):
        OptimConfig(betas=(0.9, 1.5))
    with pytest.raises(ConfigError, match=r"^train\.steps: must be an integer, got 300\.5$"):
        TrainConfig(steps=300.5)
    with pytest.raises(ConfigError, match=r"^model\.logit_cap: must be a finite number or null, got inf$"):
        ModelConfig(logit_cap=float("inf"))
    assert OptimConfig(clip=None).clip is None  # null switches clipping off
    assert OptimConfig(lr=1).lr == 1.0 and isinstance(OptimConfig(lr=1).lr, float)
    assert TrainConfig(device="cuda:1").device == "cuda:1"


def test_build_section_type_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^train\.steps: must be an integer, got '300'$"):
        build_section(TrainConfig, {"steps": "300"}, "train.")  # the config path reads it as 300 first
    with pytest.raises(ConfigError, match=r"^model\.n_head: must be an integer, got \['four'\]$"):
        build_section(ModelConfig, {"n_head": ["four"]}, "model.")


def test_tokenizer_is_bytes_or_a_plausible_transformers_name(config, monkeypatch):
    config["data"]["tokenizer"] = "not a tokenizer!"
    message = expand_error(config)
    assert "data.tokenizer" in message and "'bytes'" in message
    monkeypatch.setattr(fields_module, "has_transformers", lambda: False)
    with pytest.raises(ConfigError) as err:
        DataConfig(tokenizer="gpt2")
    assert "data.tokenizer" in str(err.value) and "pip install transformers" in str(err.value)
    assert "or use 'bytes'" in str(err.value)
    monkeypatch.setattr(fields_module, "has_transformers", lambda: True)
    assert DataConfig(tokenizer="EleutherAI/gpt-neox-20b").tokenizer == "EleutherAI/gpt-neox-20b"


# ---- the tokenizer's vocabulary, at plan time (ofe/plan/vocab.py) ---------------------------------------

@pytest.fixture
def saved_tokenizer(tmp_path) -> str:
    """A 300-token byte-level BPE (tests/helpers/hf_models.py) in a local folder, as save_pretrained writes it."""
    pytest.importorskip("transformers")
    from tests.helpers import hf_models

    path = tmp_path / "tok"
    hf_models.tokenizer().save_pretrained(path)
    return str(path)


@pytest.mark.usefixtures("no_network")
def test_a_model_vocab_below_a_local_tokenizers_is_refused_at_plan_time(config, saved_tokenizer, monkeypatch):
    import transformers

    loads = []
    load = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: loads.append(a) or load(*a, **k))
    config["data"]["tokenizer"] = saved_tokenizer
    config["defaults"]["model"] = {"vocab_size": 299}
    message = expand_error(config)
    assert (f"model.vocab_size: 299 is smaller than the tokenizer's vocabulary (300 for data.tokenizer "
            f"{saved_tokenizer!r}); must be >= 300") in message
    config["defaults"]["model"] = {"vocab_size": 300}
    runs = grid.expand(config, SCHEMA)
    assert len(runs) > 10 and {r.config.model.vocab_size for r in runs.values()} == {300}
    assert len(loads) == 1  # loaded once for the whole plan, not once per run


def test_a_tokenizer_path_that_is_missing_or_holds_no_tokenizer_is_refused(config, tmp_path):
    pytest.importorskip("transformers")
    config["data"]["tokenizer"] = str(tmp_path / "no-such-tokenizer")
    message = expand_error(config)
    assert "data.tokenizer" in message and repr(str(tmp_path / "no-such-tokenizer")) in message
    (tmp_path / "empty").mkdir()
    config["data"]["tokenizer"] = str(tmp_path / "empty")
    message = expand_error(config)
    assert message.startswith(f"config.yaml: data.tokenizer: {str(tmp_path / 'empty')!r} exists but "
                              "transformers cannot load a tokenizer from it"), message


@pytest.mark.usefixtures("no_network", "hub_online")
def test_a_hub_tokenizer_not_cached_here_does_not_fail_planning(config, monkeypatch):
    """Online, the prepare step may download it; training checks the vocabulary. (Offline, planning refuses
    it: tests/unit/plan/test_offline.py.)"""
    pytest.importorskip("transformers")
    import socket

    tried = []
    monkeypatch.setattr(socket.socket, "connect", lambda *a: tried.append(a))
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: tried.append(a))
    config["data"]["tokenizer"] = "ofe-tests/no-such-tokenizer"
    config["defaults"]["model"] = {"vocab_size": 256}
    assert grid.expand(config, SCHEMA) and tried == []


def test_quant_bits_are_the_supported_ones(config):
    config["quant"]["bits"] = [8, 5]
    message = expand_error(config)
    assert "quant.bits[1]" in message and "[4, 6, 8]" in message


def test_quant_bits_have_one_definition():
    """The schema's literal enum and QuantConfig's set are the same, whichever way the bits arrive."""
    schema = yaml.safe_load(SCHEMA.read_text())
    assert schema["properties"]["quant"]["properties"]["bits"]["items"]["enum"] == list(SUPPORTED_BITS)
    assert build_section(QuantConfig, {"bits": [4, 6, 8]}, "quant.").bits == (4, 6, 8)
    for bits in (5, 2, 16):  # inside the old 2..16, which `--quant-json` let through
        with pytest.raises(ConfigError) as err:
            build_section(QuantConfig, {"bits": [8, bits]}, "quant.")
        assert str(err.value) == f"quant.bits[1]: {bits} is not allowed; choose from [4, 6, 8]"


def test_quantise_cli_refuses_unsupported_bits_before_reading_the_run(tmp_path, capsys):
    assert main(["quantise", "--run", str(tmp_path / "no-run"), "--quant-json", '{"bits": [5]}']) == 2
    assert "quant.bits[0]: 5 is not allowed; choose from [4, 6, 8]" in capsys.readouterr().err


# ---- numbers as users write them -------------------------------------------------------------------

def test_numeric_strings_in_numeric_fields_are_read_as_numbers(config):
    config["defaults"]["lr"] = "1e-2"  # YAML 1.1 reads 1e-2 as a string
    config["defaults"]["train"]["steps"] = "300"
    config["defaults"]["optim"]["betas"] = ["0.9", ".95"]
    config["studies"]["lr"]["grid"]["lr"] = ["3e-3", "1E-2"]
    config["studies"]["eps"]["grid"]["optim.eps"] = ["1e-8", "1e-4", "1e-3"]
    config["quant"]["calib_batches"] = "4"
    config["quant"]["bits"] = ["8", "4"]
    runs = grid.expand(config, SCHEMA)
    assert len(runs) == 23
    run = runs["tiny/pre_ln/beta1/adamw/lr0.003/seed0"]
    assert run.config.optim.lr == 0.003 and run.config.train.steps == 300
    assert run.config.optim.betas == (0.9, 0.95)
    assert "tiny/pre_ln/beta1/adamw/lr0.01/seed1_optim.eps0.0001" in runs
    plan = plan_from_config(config, SCHEMA, REPO / "results" / "data")
    assert plan["quant"]["calib_batches"] == 4 and plan["config"]["defaults"]["lr"] == 0.01
    assert plan["quant"]["bits"] == (8, 4)


@pytest.mark.parametrize("value", ["abc", "inf", "nan", "1e-2x", "0x10"])
def test_non_numeric_strings_are_still_refused_by_key(config, value):
    config["studies"]["lr"]["grid"]["lr"] = [0.003, value]
    message = expand_error(config)
    assert "studies.lr.grid.lr[1]" in message and repr(value) in message


def test_integer_fields_take_only_integral_strings(config):
    config["defaults"]["train"]["steps"] = "300.0"
    message = expand_error(config)
    assert "defaults.train.steps" in message and "integer" in message


# ---- grid size -----------------------------------------------------------------------------------

def test_a_huge_grid_fails_at_once_with_its_size_and_how_to_raise_the_limit(config):
    config["studies"]["lr"]["grid"]["lr"] = [round(1e-4 * (i + 1), 6) for i in range(1000)]
    config["studies"]["lr"]["grid"]["seed"] = list(range(10_000))
    start = time.perf_counter()
    message = expand_error(config)
    assert time.perf_counter() - start < 1.0
    assert "20,000,000" in message  # 2 blocks x 1,000 lrs x 10,000 seeds
    assert "max_runs" in message and "20,000" in message


def test_max_runs_raises_or_lowers_the_limit(config):
    # by hand: norms 7 + beta 4 + lr 2x2 + eps 3x2 + optimizers 2x2 + adafactor 2 + muon 2x2 = 31 points
    config["max_runs"] = 30
    message = expand_error(config)
    assert "31" in message and "max_runs" in message
    config["max_runs"] = 31
    assert len(grid.expand(config, SCHEMA)) == 23


# ---- run ids ---------------------------------------------------------------------------------------

def test_default_run_ids_are_unchanged(config):
    ids = set(grid.expand(config, SCHEMA))
    assert {"tiny/op/beta0.2/adamw/lr0.01/seed0", "tiny/pre_ln/beta1/adamw/lr0.003/seed0",
            "tiny/op/beta1/adamw/lr0.01/seed0", "tiny/op/beta0.1/adamw/lr0.01/seed0",
            "tiny/pre_ln/beta1/adamw/lr0.01/seed0_optim.eps0.0001",
            "tiny/pre_ln/beta1/adamw/lr0.01/seed1_optim.eps0.001",
            "tiny/pre_ln/beta1/rotated_adafactor/lr0.01/seed0"} <= ids


@pytest.mark.parametrize("value, text", [
    (1e-2, "0.01"), (1.0000001e-2, "0.010000001"), (1.0, "1"), (0.2, "0.2"), (1e-8, "1e-08"),
    (3, "3"), ([0.9, 0.95], "0.9,0.95"), ((0.9, 0.99), "0.9,0.99"), (None, "none"), (True, "true"),
    (False, "false"), ("rms", "rms"),
])
def test_folder_names_are_exact(value, text):
    assert grid.format_value(value) == text


def test_close_lrs_get_their_own_folders_and_betas_sweep_names_are_clean(config):
    config["studies"] = {"lr": {"grid": {"lr": [1e-2, 1.0000001e-2]}},
                         "betas": {"grid": {"optim.betas": [[0.9, 0.95], [0.9, 0.99]]}}}
    runs = grid.expand(config, SCHEMA)
    assert "tiny/pre_ln/beta1/adamw/lr0.010000001/seed0" in runs
    assert "tiny/pre_ln/beta1/adamw/lr0.01/seed0_optim.betas0.9,0.99" in runs
    assert len(runs) == 3  # betas 0.9,0.95 is the default: the same run as lr 1e-2


def test_one_and_one_point_zero_are_one_run(config):
    config["studies"] = {"a": {"grid": {"block": ["op"], "beta": [1]}},
                         "b": {"grid": {"block": ["op"], "beta": [1.0]}}}
    runs = grid.expand(config, SCHEMA)
    assert list(runs) == ["tiny/op/beta1/adamw/lr0.01/seed0"] and runs[list(runs)[0]].studies == ["a", "b"]


def test_two_configs_sharing_a_folder_are_refused(config, monkeypatch):
    # no two configs share a folder with exact names; a lossy name (6 significant digits, the old
    # format) shows the check: 1e-2 and 1.0000001e-2 would both be lr0.01
    monkeypatch.setattr(grid, "format_value", lambda v: format(v, "g") if isinstance(v, float) else str(v))
    config["studies"] = {"first": {"grid": {"lr": [1e-2]}}, "second": {"grid": {"lr": [1.0000001e-2]}}}
    message = expand_error(config)
    assert "studies.first" in message and "studies.second" in message
    assert "tiny/pre_ln/beta1/adamw/lr0.01/seed0" in message


@pytest.mark.parametrize("device", ["cpu; touch /tmp/ofe-pwned", "../../x", "cuda0", "cuda:0 "])
def test_device_values_that_could_escape_or_inject_are_refused(config, device):
    config["studies"]["lr"]["grid"]["train.device"] = ["cpu", device]
    message = expand_error(config)
    assert "studies.lr.grid.train.device[1]" in message and "'auto', 'cpu', 'cuda' or 'cuda:N'" in message


def test_a_value_outside_the_safe_folder_characters_is_refused_naming_the_axis(config):
    config["studies"]["lr"]["grid"]["train.device"] = ["cuda:0"]  # a valid device, but ':' in a folder
    message = expand_error(config)
    assert "studies.lr.grid.train.device[0]: 'cuda:0'" in message
    assert "letters, digits and . _ , + = -" in message


def test_resolve_run_refuses_an_unsafe_folder_name_itself(config):
    # the backstop behind the per-value checks, for callers that resolve points directly
    point = {"scale": "tiny", "block": "pre_ln", "optimizer": "adamw", "lr": 0.01, "seed": 0, "beta": None,
             "train.device": "cuda:1"}
    with pytest.raises(ConfigError, match=r"grid\.train\.device: 'cuda:1' cannot be part of a run folder"):
        grid.resolve_run(config, point)


# ---- text-valued axes ------------------------------------------------------------------------------

def test_a_text_axis_plans_and_keeps_its_type(config):
    config["studies"] = {"qk": {"grid": {"model.qk_norm": ["none", "rms"]}}}
    plan = plan_from_config(config, SCHEMA, REPO / "results" / "data")
    values = [r["grid"]["model.qk_norm"] for r in plan["runs"]]
    assert values == ["none", "rms"] and all(type(v) is str for v in values)
    assert [r["config"]["model"]["qk_norm"] for r in plan["runs"]] == ["none", "rms"]


# ---- paths and names -------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, expected", [
    ("results_dir", "../outside", ["results_dir", "'../outside'", "'..'"]),
    ("results_dir", "res ults", ["results_dir", "letters, digits and _ . / -"]),
    ("results_dir", "a/../../b", ["results_dir", "'..'"]),
    ("report", "reports/index.txt", ["report", ".html"]),
    ("report", "reports/$(id).html", ["report", "letters, digits and _ . / -"]),
    # a leading '-' reads as an option to the commands the workflow passes these paths to, quoted or not
    ("results_dir", "-x", ["results_dir: '-x' is not allowed", "none starting with '-'"]),
    ("results_dir", "out/-rf", ["results_dir: 'out/-rf' is not allowed", "none starting with '-'"]),
    ("report", "--help.html", ["report: '--help.html' is not allowed", "none starting with '-'"]),
    ("report", "reports/-page.html", ["report: 'reports/-page.html' is not allowed", "none starting with '-'"]),
])
def test_results_dir_and_report_must_be_safe_paths(config, key, value, expected):
    config[key] = value
    message = expand_error(config)
    for fragment in expected:
        assert fragment in message


@pytest.mark.parametrize("key, value", [("results_dir", "res-ults/a-b_c.d"), ("results_dir", "/abs/x-"),
                                        ("report", "my-reports/x-1.html")])
def test_a_dash_inside_a_path_component_is_fine(config, key, value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing there is an existing file or folder of that name
    config[key] = value
    assert grid.expand(config, SCHEMA)


def test_results_dir_is_not_a_file_and_report_not_a_folder(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "page.html").mkdir()
    config["results_dir"] = "afile"
    assert "results_dir: 'afile' is an existing file" in expand_error(config)
    config["results_dir"] = "results"
    config["report"] = "page.html"
    assert "report: 'page.html' is an existing folder" in expand_error(config)


@pytest.mark.parametrize("name", ["my study", "../evil", "a/b", "ü"])
def test_study_names_are_plain(config, name):
    config["studies"][name] = {"grid": {"block": ["op"]}}
    message = expand_error(config)
    assert "studies" in message and repr(name) in message and "letters, digits, '_' and '-'" in message


# ---- the launcher ----------------------------------------------------------------------------------

def test_launcher_file_must_exist(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config["launcher_file"] = "profiles/nowhere.yaml"
    with pytest.raises(ConfigError, match=r"launcher_file: 'profiles/nowhere.yaml' does not exist"):
        grid.launcher_settings(config, SCHEMA)


@pytest.mark.parametrize("launcher, expected", [
    ({"cluster": "kubernetes"}, ["launcher.cluster", "'kubernetes'", "['local', 'slurm']"]),
    ({"cluster": "slurm", "slurm": {"partiton": "gpu"}},
     ["launcher.slurm", "unknown key 'partiton'", "'partition'", "'account'"]),
    ({"cluster": "slurm", "timeout_mins": 5}, ["launcher", "unknown key 'timeout_mins'", "'timeout_min'"]),
    ({"cluster": "local", "scales": {"tiny": {"gpu": 1}}}, ["launcher.scales.tiny", "unknown key 'gpu'"]),
    ({"cluster": "local", "scales": {"tinny": {"mem_gb": 4}}}, ["launcher.scales", "unknown key 'tinny'", "'tiny'"]),
    ({"cluster": "local", "poll_s": float("nan")}, ["launcher.poll_s", "finite"]),
    ({"cluster": "local", "timeout_min": 0}, ["launcher.timeout_min", "minimum"]),
])
def test_launcher_keys_are_checked_everywhere(config, tmp_path, launcher, expected):
    (tmp_path / "launcher.yaml").write_text(yaml.safe_dump(launcher))
    config["launcher_file"] = str(tmp_path / "launcher.yaml")
    with pytest.raises(ConfigError) as err:
        grid.launcher_settings(config, SCHEMA)
    for fragment in expected:
        assert fragment in str(err.value)
    assert "launcher_file" in str(err.value)  # the message says which file
    config.pop("launcher_file")
    config["launcher"] = launcher  # the same check on config.yaml's own launcher section
    for fragment in expected:
        assert fragment in expand_error(config)


def test_the_slurm_profile_validates_and_numbers_are_read(config, tmp_path):
    config["launcher_file"] = str(REPO / "profiles" / "slurm" / "launcher.yaml")
    launcher = grid.launcher_settings(config, SCHEMA)
    assert launcher["cluster"] == "slurm" and launcher["scales"]["tiny"]["timeout_min"] == 60
    (tmp_path / "l.yaml").write_text("cluster: local\ntimeout_min: '30'\npoll_s: 5e-1\n")
    config["launcher_file"] = str(tmp_path / "l.yaml")
    assert grid.launcher_settings(config, SCHEMA) == {"cluster": "local", "timeout_min": 30, "poll_s": 0.5}


def test_schema_lists_exactly_submitits_slurm_parameters():
    import submitit

    slurm = yaml.safe_load(SCHEMA.read_text())["$defs"]["launcher"]["properties"]["slurm"]
    assert set(slurm["properties"]) == set(submitit.SlurmExecutor._valid_parameters())
    assert slurm["additionalProperties"] is False
    assert {"partition", "account", "qos", "constraint"} <= set(slurm["properties"])  # launch.SLURM_ENV


def test_batch_must_split_over_the_processes_of_each_scale(config):
    runs = grid.expand(config, SCHEMA).values()  # tiny: batch 16
    grid.check_launcher(runs, {"cluster": "local", "tasks_per_node": 4})
    grid.check_launcher(runs, {"cluster": "slurm", "tasks_per_node": 2, "nodes": 8})
    with pytest.raises(ConfigError) as err:
        grid.check_launcher(runs, {"cluster": "local", "tasks_per_node": 3})
    assert "train.batch_size 16" in str(err.value) and "3 processes" in str(err.value)
    with pytest.raises(ConfigError) as err:
        grid.check_launcher(runs, {"cluster": "slurm", "scales": {"tiny": {"tasks_per_node": 2, "nodes": 3}}})
    assert "6 processes" in str(err.value) and "launcher.scales.tiny" in str(err.value)


# ---- duplicate keys --------------------------------------------------------------------------------

def test_duplicate_yaml_keys_are_refused_with_their_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("defaults:\n  lr: 1.0e-2\n  seed: 0\n  lr: 3.0e-3\nstudies: {}\n")
    with pytest.raises(ConfigError) as err:
        grid.load_config(path)
    message = str(err.value)
    assert "duplicate key 'lr'" in message and "line 4" in message and "line 2" in message
    path.write_text("a: {x: 1, x: 2}\n")
    with pytest.raises(ConfigError, match="duplicate key 'x'"):
        grid.load_config(path)
    path.write_text("base: &b {x: 1}\nother:\n  <<: *b\n  y: 2\n")  # a merge key is not a duplicate
    assert grid.load_config(path)["other"] == {"x": 1, "y": 2}


def test_check_config_cli_refuses_duplicate_keys(tmp_path):
    text = (REPO / "config.yaml").read_text().replace("  seed: 0\n", "  seed: 0\n  seed: 1\n", 1)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    out = subprocess.run([sys.executable, "-m", "ofe", "check-config", str(path), "--schema", str(SCHEMA)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "duplicate key 'seed'" in out.stderr and "Traceback" not in out.stderr


def test_op_beta_follows_the_model_depth(config):
    """OP's beta is 0.2 up to the public code's 12 layers and 0.2 * sqrt(12 / L) deeper, for the scale's
    own depth and for a swept model.n_layer alike; norm blocks keep beta 1."""
    config["studies"] = {"deep": {"grid": {"block": ["op", "pre_ln"], "scale": ["tiny", "350m"]}},
                         "sweep": {"grid": {"block": ["op"], "model.n_layer": [4, 12, 48]}}}
    runs = grid.expand(config, SCHEMA).values()
    beta = {(r.grid["block"], r.config.model.n_layer): r.config.model.beta for r in runs}
    assert beta[("op", 4)] == 0.2 and beta[("op", 12)] == 0.2
    assert beta[("op", 24)] == pytest.approx(0.2 * math.sqrt(0.5))
    assert beta[("op", 48)] == pytest.approx(0.1)
    assert beta[("pre_ln", 24)] == 1.0
