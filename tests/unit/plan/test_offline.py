"""Offline compute nodes (ofe/plan/offline.py, issue 22): with HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1,
planning refuses a tokenizer, a hub dataset or a checkpoint that is not in the local cache, naming the key
and the command that fills the cache; online it passes as before. The prepare step names the key too,
never a raw OSError. Nothing here reaches a network: the cache is an empty folder under tmp_path."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from ofe.__main__ import main
from ofe.config import ConfigError, DataConfig
from ofe.plan import plan_from_config
from tests.helpers import REPO
from tests.helpers.workflow import TEST_CONFIG

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("no_network")
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
FILL = "python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('gpt9-nonexistent')\""


def _hf_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, offline: bool) -> Path:
    """HF_HOME at an empty tmp cache; huggingface_hub and datasets read their flags at import, so their
    constants are patched too (a job started with this environment would read it from the start)."""
    import huggingface_hub.constants as hub_constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if offline:
            monkeypatch.setenv(var, "1")
        else:
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
    try:
        import datasets.config as ds_config
    except ImportError:
        return home
    monkeypatch.setattr(ds_config, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(ds_config, "HF_DATASETS_OFFLINE", offline)
    monkeypatch.setattr(ds_config, "HF_DATASETS_CACHE", home / "datasets")
    return home


@pytest.fixture
def offline(monkeypatch, tmp_path) -> Path:
    return _hf_env(monkeypatch, tmp_path, True)


@pytest.fixture
def online(monkeypatch, tmp_path) -> Path:
    return _hf_env(monkeypatch, tmp_path, False)


def _config(**data) -> dict:
    config = copy.deepcopy(TEST_CONFIG)
    config["data"] = {**config["data"], **data}
    config["defaults"]["model"] = {**config["defaults"]["model"], "vocab_size": 512}
    return config


def _refusal(config: dict) -> str:
    with pytest.raises(ConfigError) as err:
        plan_from_config(config, SCHEMA)
    return str(err.value)


@pytest.fixture
def tokenizer_folder(tmp_path) -> Path:
    from tests.helpers import hf_models

    path = tmp_path / "tok"
    hf_models.tokenizer().save_pretrained(path)
    return path


# ---- tokenizers ---------------------------------------------------------------------------------------

def test_offline_plan_refuses_an_uncached_hub_tokenizer_naming_the_key_and_the_command(offline, tmp_path, capsys):
    message = _refusal(_config(tokenizer="gpt9-nonexistent"))
    assert ("data.tokenizer: 'gpt9-nonexistent' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
            "forbids downloading it") in message
    assert FILL in message and "hf download gpt9-nonexistent" in message and str(offline / "hub") in message
    # the CLI: exit 2, the message last, no traceback
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(_config(tokenizer="gpt9-nonexistent")))
    assert main(["plan", "--config", str(path), "--out", str(tmp_path / "plan.json")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("config.yaml: data.tokenizer:")
    assert not (tmp_path / "plan.json").exists()


def test_online_an_uncached_hub_tokenizer_still_passes_planning(online):
    plan = plan_from_config(_config(tokenizer="gpt9-nonexistent"), SCHEMA)
    assert plan["runs"] and plan["data"]["config"]["tokenizer"] == "gpt9-nonexistent"


def test_offline_a_local_or_cached_tokenizer_passes(offline, tokenizer_folder):
    from tests.helpers import hf_models

    assert plan_from_config(_config(tokenizer=str(tokenizer_folder)), SCHEMA)["runs"]
    hf_models.config("gpt2").save_pretrained(tokenizer_folder)  # a hub repo has its config.json
    hf_models.fake_hub_cache(offline / "hub", tokenizer_folder, "ofe-test/tok", {"main": "a" * 40})
    plan = plan_from_config(_config(tokenizer="ofe-test/tok"), SCHEMA)
    assert plan["runs"]
    small = _config(tokenizer="ofe-test/tok")
    small["defaults"]["model"]["vocab_size"] = 299  # loaded from the cache: its 300 tokens are known
    assert "model.vocab_size: 299 is smaller" in _refusal(small)


def test_offline_prepare_of_an_uncached_tokenizer_is_a_clear_error_not_an_oserror(offline, tmp_path, capsys):
    from ofe.core.data import prepare

    with pytest.raises(ConfigError) as err:
        prepare(DataConfig(tokenizer="gpt9-nonexistent", max_documents=20), tmp_path / "data")
    message = str(err.value)
    assert message.startswith("data.tokenizer: 'gpt9-nonexistent' could not be loaded (OSError: ")
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in message and FILL in message
    code = main(["prepare", "--data-json", json.dumps({"tokenizer": "gpt9-nonexistent", "max_documents": 20}),
                 "--out", str(tmp_path / "data")])
    err_text = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err_text
    assert err_text.strip().splitlines()[-1].startswith("data.tokenizer: 'gpt9-nonexistent' could not be loaded")
    assert not (tmp_path / "data" / "meta.json").exists()


# ---- datasets -----------------------------------------------------------------------------------------

def test_offline_plan_refuses_an_uncached_hub_dataset(offline):
    message = _refusal(_config(source="datasets", path="ofe-test/no-such-corpus", name="python"))
    assert ("data.path: 'ofe-test/no-such-corpus' is not in the local Hugging Face cache and "
            "HF_DATASETS_OFFLINE=1 forbids downloading it") in message
    assert "python -c \"import datasets; datasets.load_dataset('ofe-test/no-such-corpus', 'python', " \
           "split='train')\"" in message


def test_offline_local_files_and_cached_hub_datasets_pass(offline, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"x = {i}\n"}) for i in range(50)))
    assert plan_from_config(_config(source="datasets", path="json", data_files=str(corpus)), SCHEMA)["runs"]
    snapshot = offline / "hub" / "datasets--ofe-test--corpus" / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "train.jsonl").write_text(corpus.read_text())
    assert plan_from_config(_config(source="datasets", path="ofe-test/corpus"), SCHEMA)["runs"]
    prepared = offline / "datasets" / "ofe-test___other_corpus" / "default" / "0.0.0" / "0123abcd"
    prepared.mkdir(parents=True)
    assert plan_from_config(_config(source="datasets", path="ofe-test/OtherCorpus"), SCHEMA)["runs"]


def test_online_an_uncached_hub_dataset_still_passes_planning(online):
    assert plan_from_config(_config(source="datasets", path="ofe-test/no-such-corpus"), SCHEMA)["runs"]


def test_offline_prepare_of_an_uncached_hub_dataset_is_a_clear_error(offline, tmp_path):
    pytest.importorskip("datasets")
    from ofe.core.data import prepare

    with pytest.raises(ConfigError) as err:
        prepare(DataConfig(source="datasets", path="ofe-test/no-such-corpus"), tmp_path / "data")
    message = str(err.value)
    assert message.startswith("data.path: dataset 'ofe-test/no-such-corpus' (split 'train') could not be loaded")
    assert "datasets.load_dataset('ofe-test/no-such-corpus', split='train')" in message


# ---- checkpoint studies -------------------------------------------------------------------------------

def _study(name: str, revisions: list[str] | None) -> dict:
    config = copy.deepcopy(TEST_CONFIG)
    entry = {"name": name, **({"revisions": revisions} if revisions else {})}
    config["studies"] = {"pythia": {"models": [entry]}}
    return config


def test_offline_plan_refuses_an_uncached_checkpoint_and_passes_a_cached_one(offline, tmp_path):
    from tests.helpers import hf_models

    message = _refusal(_study("ofe-test/tiny-neox", ["step1000"]))
    assert ("studies.pythia.models[0].revisions: 'ofe-test/tiny-neox@step1000' is not in the local Hugging Face "
            "cache and HF_HUB_OFFLINE=1 forbids downloading it") in message
    assert "hf download ofe-test/tiny-neox --revision step1000" in message
    model = hf_models.save(hf_models.build("gpt_neox"), tmp_path / "tiny-neox")
    hf_models.fake_hub_cache(offline / "hub", model, "ofe-test/tiny-neox", {"step1000": "d" * 40})
    plan = plan_from_config(_study("ofe-test/tiny-neox", ["step1000"]), SCHEMA)
    assert [c["ckpt_id"] for c in plan["checkpoints"]] == ["ofe-test--tiny-neox/step1000"]
    assert "studies.pythia.models[0].name: 'ofe-test/tiny-neox' is not in" in _refusal(
        _study("ofe-test/tiny-neox", None))  # main is not cached, only step1000


def test_online_an_uncached_checkpoint_still_passes_planning(online):
    assert plan_from_config(_study("ofe-test/tiny-neox", ["step1000"]), SCHEMA)["checkpoints"]


def test_the_offline_flags_follow_the_hub_and_datasets_rules(monkeypatch):
    import huggingface_hub.constants as hub_constants

    from ofe.plan import offline

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert offline.hub_offline_var() is None and offline.datasets_offline_var() is None
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")  # the older spelling huggingface_hub honours too
    assert offline.hub_offline_var() == "TRANSFORMERS_OFFLINE=yes"
    assert offline.datasets_offline_var() == "TRANSFORMERS_OFFLINE=yes"  # datasets follows the hub by default
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    assert offline.datasets_offline_var() is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert offline.hub_offline_var() == "HF_HUB_OFFLINE=1"
    assert offline.is_hub_dataset("org/corpus") and not offline.is_hub_dataset("text")


def test_offline_inspect_of_an_uncached_model_ends_in_one_clear_line(offline, tmp_path, capsys):
    code = main(["inspect", "--model", "ofe-test/not-cached", "--revision", "step1000", "--out", str(tmp_path / "i")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ofe inspect: ofe-test/not-cached at revision step1000 is not in the local cache")
    assert "hf download ofe-test/not-cached --revision step1000" in last


@pytest.mark.slow  # starts snakemake
def test_offline_the_workflow_stops_before_any_job_naming_the_tokenizer(offline, tmp_path):
    import yaml

    from tests.helpers.workflow import snakemake

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_config(tokenizer="gpt9-nonexistent"), sort_keys=False))
    dry = snakemake(tmp_path, "-n")
    assert dry.returncode != 0 and "Traceback" not in dry.stderr, dry.stderr[-3000:]
    assert ("data.tokenizer: 'gpt9-nonexistent' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
            "forbids downloading it") in dry.stderr and FILL in dry.stderr
    assert not (tmp_path / "results").exists()
