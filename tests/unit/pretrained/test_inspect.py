"""`ofe inspect` on tiny random models of each family, a planted outlier against its closed form, an
`ofe` run folder, the errors, and that nothing is fetched from a hub (tests/helpers/hf_models.py builds all)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from ofe.__main__ import main
from ofe.config import QuantConfig
from ofe.core import metrics
from ofe.io import read_metadata
from ofe.pretrained import hf
from ofe.pretrained.hf import InspectError
from ofe.pretrained.inspection import Settings, inspect, revision_step
from tests.helpers import REPO, hf_models
from tests.helpers.runs import tiny_run

SMALL = dict(settings=Settings(batches=2, batch_size=2, context=32),
             quant=QuantConfig(calib_batches=2, eval_batches=2))
NO_QUANT = dict(settings=Settings(batches=2, batch_size=2, context=32), quant=QuantConfig(protocols=()))
PER_SITE = set(metrics.STREAM_METRICS)
MASSIVE = {"massive_top1", "massive_top2", "massive_top3", "massive_median", "massive_ratio"}
ATTENTION = {"attention_entropy", "sink_rate", "first_token_attention", "attention_sparsity"}

pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def tok():
    return hf_models.tokenizer()


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return hf_models.text_file(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok) -> dict[str, Path]:
    """Every family, saved once for the module."""
    root = tmp_path_factory.mktemp("models")
    return {f: hf_models.save(hf_models.build(f), root / f, tok) for f in hf_models.FAMILIES}


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_inspect_writes_training_metrics_and_both_protocols(family, saved, text, tmp_path):
    summary = inspect(tmp_path, model=str(saved[family]), text_file=text, **SMALL)
    df = pd.read_parquet(tmp_path / "metrics.parquet")
    L = hf_models.LAYERS
    sites = {(layer, site) for layer, site in zip(df.layer, df.site)}
    assert sites == ({(i, "block_input") for i in range(L)} | {(i, "attention") for i in range(L)}
                     | {(L, "unembed_input_pre_norm"), (L, "unembed_input"), (-1, "val")})
    for layer, site in sites - {(-1, "val")}:
        got = set(df[(df.layer == layer) & (df.site == site)].metric)
        want = ATTENTION if site == "attention" else PER_SITE | (MASSIVE if site in metrics.MASSIVE_SITES else set())
        assert got == want, (layer, site)
    assert df.value.map(math.isfinite).all() and (df.step == 0).all() and (df.tokens == 0).all()
    ent = df[df.metric == "attention_entropy"].value
    assert (ent > 0).all() and (ent < math.log(32)).all()  # a causal row over at most 32 keys

    q = pd.read_parquet(tmp_path / "quant.parquet")
    assert set(zip(q.protocol, q.bits)) == {("static_per_tensor", 8), ("dynamic_per_token", 8)}
    assert q.ppl_fp.map(math.isfinite).all() and q.ppl_q.map(math.isfinite).all()
    # a random model predicts about uniformly over its 320 embeddings, and 8 bits barely move that
    assert 0.8 * hf_models.VOCAB < q.ppl_fp.iloc[0] < 1.25 * hf_models.VOCAB
    assert ((q.ppl_q - q.ppl_fp).abs() / q.ppl_fp < 0.01).all()
    val = df[df.site == "val"].value.item()
    assert val == pytest.approx(math.log(q.ppl_fp.iloc[0]))

    meta = read_metadata(tmp_path / "quant.parquet")
    assert meta == read_metadata(tmp_path / "metrics.parquet")
    assert meta["inspect"]["path"] == str(saved[family].resolve()) and meta["inspect"]["revision"] is None
    assert meta["inspect"]["n_layers"] == L and meta["provenance"]["hf_libraries"]["transformers"]
    assert meta["provenance"]["git"]["revision"] and meta["data"]["text_file"] == str(text.resolve())
    static = next(r for r in meta["quant_runs"] if r["protocol"] == "static_per_tensor")
    assert static["attention_not_quantised"] is None  # scores and probabilities quantised too
    written = json.loads((tmp_path / "inspect.json").read_text())
    assert written["ppl_fp"] == summary["ppl_fp"] and written["notes"] == [] and meta["inspect"]["notes"] == []
    assert written["super_weight"] is None and len(written["super_weight_scan"]["layers"]) == L  # none planted


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_block_inputs_are_the_models_own_hidden_states(family):
    """The hooks see what the model reports as hidden_states[l] (the stream entering layer l), and the
    entropy is that of the probabilities it returns: two independent routes to the same tensors."""
    model = hf_models.build(family)
    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    rows = {(layer, site, m): v for layer, site, m, v in hf.probe(model, idx)}
    with torch.no_grad():
        out = model(input_ids=idx, output_hidden_states=True, output_attentions=True, use_cache=False)
    for i in range(hf_models.LAYERS):
        assert rows[(i, "block_input", "kurtosis")] == pytest.approx(metrics.kurtosis(out.hidden_states[i]), rel=1e-6)
        p = out.attentions[i]
        assert rows[(i, "attention", "attention_entropy")] == pytest.approx(
            (-(p * p.clamp_min(1e-30).log()).sum(-1)).mean().item(), rel=1e-5)


def test_attention_entropy_from_probabilities_equals_the_query_key_version():
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, 10, 8, generator=g)
    logits = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(~torch.ones(10, 10).tril().bool(), -math.inf)
    assert metrics.attention_entropy_from_probs(logits.softmax(-1)) == pytest.approx(
        metrics.attention_entropy(q, k), rel=1e-6)


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_planted_outlier_channel_matches_closed_form(family, tok, text, tmp_path):
    """Embeddings of +-s in every channel (random signs) and one channel c of +-r*s, positions zeroed:
    the stream entering layer 0 is the token's embedding, so over any tokens s_j^2 = s^2 for j != c and
    s_c^2 = r^2 s^2 exactly, and Kurt = mean(s_j^4) / mean(s_j^2)^2 = d (r^4 + d - 1) / (r^2 + d - 1)^2.
    (GPT-NeoX and Llama have rotary positions, OPT and GPT-2 learned ones, set to zero here.)"""
    d, r, s = hf_models.D, 10.0, 0.05
    model = hf_models.plant_outlier(hf_models.build(family), r, s)
    inspect(tmp_path / "out", model=str(hf_models.save(model, tmp_path / "m", tok)), text_file=text, **NO_QUANT)
    df = pd.read_parquet(tmp_path / "out" / "metrics.parquet").set_index(["layer", "site", "metric"]).value
    expected = hf_models.planted_kurtosis(r)
    assert expected == pytest.approx(18.70, abs=0.01)
    assert df[(0, "block_input", "kurtosis")] == pytest.approx(expected, rel=1e-5)
    assert df[(0, "block_input", "rms")] == pytest.approx(s * math.sqrt((r**2 + d - 1) / d), rel=1e-5)
    assert df[(1, "block_input", "kurtosis")] > 2  # the outlier survives the first layer
    assert len(pd.read_parquet(tmp_path / "out" / "quant.parquet")) == 0  # no protocol asked for


@pytest.mark.slow  # starts `python -m ofe inspect` in a process of its own
def test_cli_inspects_the_stdlib_corpus_offline_and_writes_nothing_to_the_hub_cache(saved, tmp_path):
    cache = tmp_path / "hub"
    cache.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(REPO)}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ofe", "inspect", "--model", str(saved["gpt_neox"]), "--out", str(out),
           "--data-config", '{"max_documents": 60}', "--batches", "1", "--batch-size", "2", "--context", "32",
           "--quant-json", '{"calib_batches": 1, "eval_batches": 1, "bits": [8, 4]}', "--threads", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "[ofe] inspect" in res.stdout and "max kurtosis" in res.stdout
    q = pd.read_parquet(out / "quant.parquet")
    assert len(q) == 4 and q.ppl_q.map(math.isfinite).all()
    assert read_metadata(out / "metrics.parquet")["data"]["data_config"]["max_documents"] == 60
    assert not any(cache.rglob("*"))  # nothing was fetched into (or even looked up in) the hub cache


def test_hub_name_resolves_offline_from_the_cache_and_reads_the_step(saved, text, tmp_path):
    """A hub cache as a download leaves it: the revision resolves to its commit, the step is read from it,
    and Pythia's tokens per step (1024 x 2048) give the tokens; an uncached revision is refused."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    cache = hf_models.fake_hub_cache(tmp_path / "hub", saved["gpt_neox"], "ofe-test/tiny-neox", {"step1000": sha})
    hf_models.fake_hub_cache(cache, saved["gpt_neox"], "EleutherAI/pythia-ofe-test", {"step1000": sha})
    summary = inspect(tmp_path / "out", model="ofe-test/tiny-neox", revision="step1000", text_file=text,
                      cache_dir=cache, **NO_QUANT)
    assert summary["step"] == 1000 and summary["resolved_commit"] == sha
    df = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert (df.step == 1000).all() and (df.tokens == -1).all()  # tokens per step unknown for this name
    meta = read_metadata(tmp_path / "out" / "metrics.parquet")["inspect"]
    assert (meta["model"], meta["revision"], meta["resolved_commit"], meta["local"]) == (
        "ofe-test/tiny-neox", "step1000", sha, False)
    inspect(tmp_path / "pythia", model="EleutherAI/pythia-ofe-test", revision="step1000", text_file=text,
            cache_dir=cache, **NO_QUANT)
    assert (pd.read_parquet(tmp_path / "pythia" / "metrics.parquet").tokens == 1000 * 1024 * 2048).all()
    with pytest.raises(InspectError, match="ofe-test/tiny-neox at revision step2000 is not in the local cache "
                                           "and the network is off/unreachable"):
        inspect(tmp_path / "out2", model="ofe-test/tiny-neox", revision="step2000", text_file=text,
                cache_dir=cache, **NO_QUANT)
    assert not (tmp_path / "out2").exists()


def test_revision_step():
    assert revision_step("step1000") == 1000 and revision_step("step0") == 0
    assert revision_step("main") == 0 and revision_step(None) == 0 and revision_step("v1-step3") == 0


def test_inspect_an_ofe_run_folder(data_dir, text, tmp_path):
    from ofe.train.trainer import train

    run = tmp_path / "run"
    train(tiny_run(data_dir, train={"steps": 12}), run)
    config = json.loads((run / "summary.json").read_text())["config"]
    res = inspect(tmp_path / "out", run=run, text_file=text, settings=Settings(batches=2, batch_size=2),
                  quant=QuantConfig(calib_batches=2, eval_batches=2, bits=(8, 4)))
    assert res["step"] == 12 and res["kind"] == "run"
    df = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    trained = pd.read_parquet(run / "metrics.parquet")
    def keys(frame):
        return set(zip(frame.layer, frame.site, frame.metric)) - {k for k in zip(frame.layer, frame.site, frame.metric)
                                                                  if k[0] == -1}
    assert keys(df) == keys(trained)  # the same sites and metrics as training's probe
    scan = res["super_weight_scan"]  # ofe's own MLP is scanned too: none planted, none found
    assert scan["module"] == "mlp.proj" and len(scan["layers"]) == config["model"]["n_layer"]
    assert res["super_weight"] is None and scan["note"] is None
    assert (df.step == 12).all() and (df.tokens == 12 * 4 * 32).all()  # batch 4 x context 32 per step
    q = pd.read_parquet(tmp_path / "out" / "quant.parquet").set_index(["protocol", "bits"])
    assert len(q) == 4 and q.ppl_fp.iloc[0] < 256  # bytes: a trained model beats uniform
    assert q.loc[("static_per_tensor", 4), "ppl_q"] > q.loc[("static_per_tensor", 8), "ppl_q"]
    meta = read_metadata(tmp_path / "out" / "quant.parquet")
    assert meta["config"] == config and meta["inspect"]["context"] == 32  # the run's context
    assert "scores and probabilities" in meta["quantised_tensors"]["static_per_tensor"]  # ofe's own protocol


def test_inspect_an_fsdp_run_folder(data_dir, text, tmp_path):
    """An fsdp run's final weights are only in the sharded checkpoint.dcp: inspect reads them through
    quantisation's loader. The weights equal those DCP's own converter reads from the shards, and the
    full-precision perplexity of the inspected model on the run's validation batches is quantise_run's."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from ofe.core.data import TokenData
    from ofe.pretrained.inspection import run_target
    from ofe.train.quantise import quantise_run
    from ofe.train.trainer import train

    run = tmp_path / "run"
    cfg = tiny_run(data_dir, train={"steps": 12, "parallel": "fsdp"})
    assert train(cfg, run)["status"] == "completed"  # one process on the CPU (gloo)
    assert (run / "checkpoint.dcp").is_dir() and not (run / "checkpoint.pt").exists()
    res = inspect(tmp_path / "out", run=run, text_file=text, **NO_QUANT)
    assert res["step"] == 12 and res["kind"] == "run" and math.isfinite(res["ppl_fp"])

    target = run_target(run)
    dcp_to_torch_save(run / "checkpoint.dcp", tmp_path / "whole.pt")
    shards = torch.load(tmp_path / "whole.pt", weights_only=False)["model"]
    weights = target.model.state_dict()
    assert set(weights) <= set(shards)
    assert all(torch.equal(weights[k], shards[k]) for k in weights)
    assert not torch.equal(weights["wte.weight"], type(target.model)(cfg.model).state_dict()["wte.weight"])

    table = quantise_run(run, QuantConfig(protocols=("dynamic_per_token",), bits=(8,), calib_batches=1,
                                          eval_batches=2), device="cpu")
    data = TokenData(cfg.data_dir, cfg.model.context, cfg.train.batch_size)
    windows = [torch.cat([x, y[:, -1:]], dim=1) for x, y in data.val_batches(2)]  # (x, y) as one window
    assert target.perplexity(target.model, windows) == table.ppl_fp.iloc[0]

    (run / "checkpoint.dcp").rename(run / "moved.dcp")
    with pytest.raises(InspectError, match=r"its final checkpoint checkpoint\.dcp \(train.parallel: fsdp, "
                                           r"sharded\) is missing"):
        inspect(tmp_path / "out2", run=run, text_file=text, **NO_QUANT)


@pytest.mark.parametrize("case", ["bert", "t5", "missing", "relative", "too_large", "revision_on_folder",
                                  "uncached_hub_name", "both_sources"])
def test_bad_input_stops_with_a_message_naming_the_model(case, saved, text, tmp_path, tok):
    kw: dict = {"text_file": text, **NO_QUANT}
    if case == "bert":
        kw["model"], match = str(hf_models.save(hf_models.build("bert"), tmp_path / "bert", tok)), \
            "BertLMHeadModel has no list of decoder layers"
    elif case == "t5":
        from transformers import T5Config

        T5Config(vocab_size=320, d_model=32).save_pretrained(tmp_path / "t5")
        kw["model"], match = str(tmp_path / "t5"), "T5Config .* is not a causal language model"
    elif case == "missing":
        kw["model"], match = str(tmp_path / "nope"), "nope: no such model folder"
    elif case == "relative":
        kw["model"], match = "./nope", r"\./nope: no such model folder"
    elif case == "too_large":
        kw["model"], kw["max_memory_gb"], match = str(saved["llama"]), 1e-6, r"parameters need about .* \(--max-memory-gb; in a checkpoint study, inspect.mem_gb\)"
    elif case == "revision_on_folder":
        kw["model"], kw["revision"], match = str(saved["opt"]), "step1000", "applies to a hub name"
    elif case == "uncached_hub_name":
        kw["model"], kw["revision"], kw["cache_dir"] = "EleutherAI/pythia-160m", "step1000", tmp_path / "empty"
        match = (r"EleutherAI/pythia-160m at revision step1000 is not in the local cache and the network is "
                 r"off/unreachable .*download it on a machine with network .*or pass a local path")
    else:
        kw["model"], kw["run"], match = str(saved["opt"]), tmp_path, "exactly one of --model"
    with pytest.raises(InspectError, match=match) as e:
        inspect(tmp_path / "out", **kw)
    if case in ("bert", "missing", "too_large", "uncached_hub_name"):
        assert kw["model"] in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_input_on_stderr(tmp_path, capsys):
    assert main(["inspect", "--model", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]) == 1
    assert f"ofe inspect: {tmp_path / 'absent'}: no such model folder" in capsys.readouterr().err
    assert main(["inspect", "--run", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "no summary.json, so not a finished ofe run" in capsys.readouterr().err
    assert main(["inspect", "--run", str(tmp_path), "--out", str(tmp_path), "--batches", "0"]) == 2


def test_unfinished_run_and_out_in_the_run_folder_are_refused(data_dir, tmp_path):
    from ofe.train.trainer import train

    cfg = tiny_run(data_dir, optim={"lr": 1e6, "warmup_frac": 0.0, "clip": None},
                   model={"norm": "none", "final_norm": "none"}, train={"steps": 50})
    assert train(cfg, tmp_path / "run")["status"] == "diverged"
    with pytest.raises(InspectError, match="the run diverged at step .* no final model to inspect"):
        inspect(tmp_path / "out", run=tmp_path / "run")
    with pytest.raises(InspectError, match="is the run folder itself"):
        inspect(tmp_path / "run", run=tmp_path / "run")
    with pytest.raises(InspectError, match="an ofe run has one final checkpoint: drop --revision"):
        inspect(tmp_path / "out", run=tmp_path / "run", revision="step10")


def test_transformers_is_imported_lazily(monkeypatch):
    """ofe (inspect's modules included) imports without transformers; inspecting a model then names
    the extra to install."""
    code = ("import sys; import ofe.__main__, ofe.pretrained.inspection, ofe.pretrained.hf, ofe.pretrained.quant, "
            "ofe.core.quant, ofe.train.quantise, ofe.train.trainer; "
            "print('transformers' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.stdout.strip() == "False", res.stderr
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(InspectError, match=r"pip install -e '\.\[hf\]'"):
        hf.require_transformers()
    with pytest.raises(InspectError, match=r"needs transformers.*pip install -e '\.\[hf\]'"):
        inspect("unused", model="EleutherAI/pythia-160m")


def test_too_little_text_says_what_to_change(saved, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("def f(x):\n    return x\n" * 20)
    with pytest.raises(InspectError, match=r"the text file .* gives \d+ tokens, and 5 batches \(the larger of "
                                           r"--batches 5 and quant eval_batches 2\) of 2 x \(context 32 \+ 1\) "
                                           r"need 330; use more data, or lower --batches"):
        inspect(tmp_path / "out", model=str(saved["gpt2"]), text_file=short,
                settings=Settings(batches=5, batch_size=2, context=32),
                quant=QuantConfig(protocols=(), eval_batches=2))
    with pytest.raises(InspectError, match="--context 256: .* has 128 positions; pass at most 128"):
        inspect(tmp_path / "out", model=str(saved["gpt2"]), text_file=short,
                settings=Settings(context=256), quant=QuantConfig(protocols=()))
