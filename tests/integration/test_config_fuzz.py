"""Malformed variants of the project's own config.yaml through the real `snakemake -n`: each stops
before any job, with exit status non-zero, the bad key named and no traceback; numeric strings a user
means as numbers plan. The variants run two at a time (one Snakemake parse is 1-3 s)."""

from __future__ import annotations

import copy
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tests.helpers import REPO
from tests.helpers.workflow import SNAKEMAKE

pytestmark = pytest.mark.slow  # ~60 Snakemake parses

BASE_TEXT = (REPO / "config.yaml").read_text()
BASE = yaml.safe_load(BASE_TEXT)


@dataclass
class Variant:
    """One mutation of config.yaml: a change to its mapping (or to its raw text), extra files in the
    work folder, and the fragments its error message must contain (empty: it must plan)."""

    name: str
    mutate: Callable[[dict], None] | None = None
    text: Callable[[str], str] | None = None
    expected: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    dirs: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)


def setter(*path, value):
    """A mutation setting config[path...] = value, creating mappings on the way."""
    def mutate(c: dict) -> None:
        for key in path[:-1]:
            c = c.setdefault(key, {})
        c[path[-1]] = value
    return mutate


def renamer(section: str, old: str, new: str):
    def mutate(c: dict) -> None:
        c[section] = {new if k == old else k: v for k, v in c[section].items()}
    return mutate


def duplicate_line(after: str, line: str):
    """Raw-text mutation: insert `line` after the first line equal to `after` (YAML keeps the last)."""
    def text(t: str) -> str:
        lines = t.splitlines(keepends=True)
        i = next(i for i, x in enumerate(lines) if x.rstrip("\n").split("#")[0].rstrip() == after)
        return "".join(lines[: i + 1] + [line + "\n"] + lines[i + 1:])
    return text


PWNED = "ofe-fuzz-pwned"  # a file an injected shell command would create in the work folder

BAD = [
    # types, non-finite and out-of-range values in defaults
    Variant("betas out of range", setter("defaults", "optim", "betas", value=[0.9, 1.5]),
            expected=["defaults.optim.betas[1]", "[0, 1)", "1.5"]),
    Variant("betas one value", setter("defaults", "optim", "betas", value=[0.9]),
            expected=["defaults.optim.betas", "2 numbers"]),
    Variant("lr inf", setter("defaults", "lr", value=float("inf")), expected=["defaults.lr", "finite"]),
    Variant("lr nan", setter("defaults", "lr", value=float("nan")), expected=["defaults.lr", "finite"]),
    Variant("lr negative", setter("defaults", "lr", value=-0.01), expected=["defaults.lr", "minimum of 0"]),
    Variant("lr text", setter("defaults", "lr", value="abc"), expected=["defaults.lr", "'abc'", "number"]),
    Variant("lr text inf", setter("defaults", "lr", value="inf"), expected=["defaults.lr", "'inf'"]),
    Variant("seed negative", setter("defaults", "seed", value=-1), expected=["defaults.seed", "minimum of 0"]),
    Variant("seed float", setter("defaults", "seed", value=1.5), expected=["defaults.seed", "integer"]),
    Variant("steps float", setter("defaults", "train", "steps", value=300.5),
            expected=["defaults.train.steps", "integer", "300.5"]),
    Variant("steps e-notation", setter("defaults", "train", "steps", value="3e2"),
            expected=["defaults.train.steps", "integer", "'3e2'"]),
    Variant("steps bool", setter("defaults", "train", "steps", value=True),
            expected=["defaults.train.steps", "integer", "True"]),
    Variant("threads zero", setter("defaults", "train", "threads", value=0),
            expected=["defaults.train.threads", "> 0"]),
    Variant("device gpu", setter("defaults", "train", "device", value="gpu"),
            expected=["defaults.train.device", "'auto', 'cpu', 'cuda' or 'cuda:N'"]),
    Variant("device shell", setter("defaults", "train", "device", value=f"cpu; touch {PWNED}"),
            expected=["defaults.train.device", "'auto', 'cpu', 'cuda' or 'cuda:N'"]),
    Variant("compile text", setter("defaults", "train", "compile", value="yes"),
            expected=["defaults.train.compile", "true or false"]),
    Variant("eps zero", setter("defaults", "optim", "eps", value=0.0), expected=["defaults.optim.eps", "> 0"]),
    Variant("weight decay negative", setter("defaults", "optim", "weight_decay", value=-0.1),
            expected=["defaults.optim.weight_decay", ">= 0"]),
    Variant("clip zero", setter("defaults", "optim", "clip", value=0), expected=["defaults.optim.clip", "> 0"]),
    Variant("min lr frac", setter("defaults", "optim", "min_lr_frac", value=1.5),
            expected=["defaults.optim.min_lr_frac", "[0, 1]"]),
    Variant("decay typo", setter("defaults", "optim", "decay", value="cosinus"),
            expected=["defaults.optim.decay", "'cosinus'", "'cosine'"]),
    Variant("unknown optim key", setter("defaults", "optim", "betaz", value=[0.9, 0.95]),
            expected=["defaults.optim.betaz", "unknown key", "'betas'"]),
    Variant("init std zero", setter("defaults", "model", "init_std", value=0.0),
            expected=["defaults.model.init_std", "> 0"]),
    Variant("vocab below bytes", setter("defaults", "model", "vocab_size", value=100),
            expected=["defaults.model.vocab_size", "256"]),
    Variant("n_head text", setter("defaults", "model", "n_head", value=["four"]),
            expected=["defaults.model.n_head", "integer"]),
    Variant("d_model not divisible", setter("defaults", "model", "d_model", value=130),
            expected=["model.d_model", "130", "n_head"]),
    # grid values, at their own keys
    Variant("grid lr text", setter("studies", "lr", "grid", "lr", value=[0.003, "abc"]),
            expected=["studies.lr.grid.lr[1]", "'abc'"]),
    Variant("grid lr inf", setter("studies", "lr", "grid", "lr", value=[0.003, float("inf")]),
            expected=["studies.lr.grid.lr[1]", "finite"]),
    Variant("grid eps negative", setter("studies", "eps", "grid", "optim.eps", value=[1e-8, -1e-4]),
            expected=["studies.eps.grid.optim.eps[1]", "> 0"]),
    Variant("grid axis typo", setter("studies", "eps", "grid", "optim.epz", value=[1e-8]),
            expected=["studies.eps.grid.optim.epz", "sweepable", "optim.eps"]),
    Variant("grid beta zero", setter("studies", "beta", "grid", "beta", value=[0.1, 0]),
            expected=["studies.beta.grid.beta[1]"]),
    Variant("grid block typo", setter("studies", "norms", "grid", "block", value=["pre_ln", "post_lm"]),
            expected=["studies.norms.grid.block[1]", "'post_lm'", "'post_ln'"]),
    Variant("grid qk_norm typo", setter("studies", "lr", "grid", "model.qk_norm", value=["none", "rmss"]),
            expected=["studies.lr.grid.model.qk_norm[1]", "'rmss'", "'rms'"]),
    Variant("grid device shell", setter("studies", "lr", "grid", "train.device", value=[f"cpu; touch {PWNED}"]),
            expected=["studies.lr.grid.train.device[0]", "'cpu'"]),
    Variant("grid device escape", setter("studies", "lr", "grid", "train.device", value=["../../x"]),
            expected=["studies.lr.grid.train.device[0]", "'cpu'"]),
    Variant("grid device colon", setter("studies", "lr", "grid", "train.device", value=["cuda:0"]),
            expected=["studies.lr.grid.train.device[0]", "'cuda:0'", "run folder"]),
    # studies, grid size, top-level keys and paths
    Variant("study name space", renamer("studies", "lr", "learning rate"),
            expected=["studies", "'learning rate'", "letters, digits"]),
    Variant("study name dots", renamer("studies", "lr", "../lr"), expected=["studies", "'../lr'"]),
    Variant("huge grid", lambda c: c["studies"]["lr"]["grid"].update(  # 2 blocks x 100 x 1,000 x 50
        lr=[round(1e-4 * (i + 1), 6) for i in range(100)], seed=list(range(1000)),
        **{"optim.eps": [float(f"1e-{i % 10 + 1}") * (1 + i // 10) for i in range(50)]}),
        expected=["lr: 10,000,000", "max_runs = 20,000", "max_runs: 10000027"]),
    Variant("max_runs below grid", setter("max_runs", value=10), expected=["max_runs = 10", "31"]),
    Variant("unknown top-level key", lambda c: c.__setitem__("studeis", {}),
            expected=["unknown key 'studeis'", "'studies'"]),
    Variant("results_dir escapes", setter("results_dir", value="../outside"),
            expected=["results_dir", "'../outside'", "'..'"]),
    Variant("results_dir space", setter("results_dir", value="my results"), expected=["results_dir", "'my results'"]),
    Variant("results_dir is a file", setter("results_dir", value="afile"), files={"afile": ""},
            expected=["results_dir", "'afile'", "existing file"]),
    Variant("report not html", setter("report", value="reports/index.txt"), expected=["report", ".html"]),
    Variant("report is a folder", setter("report", value="reports/index.html"), dirs=["reports/index.html"],
            expected=["report", "existing folder"]),
    # data and quant
    Variant("tokenizer malformed", setter("data", "tokenizer", value="bad tokenizer!"),
            expected=["data.tokenizer", "'bytes'"]),
    Variant("val_fraction", setter("data", "val_fraction", value=1.5), expected=["data.val_fraction"]),
    Variant("quant bits", setter("quant", "bits", value=[8, 5]), expected=["quant.bits[1]", "[4, 6, 8]"]),
    Variant("quant percentile nan", setter("quant", "percentile", value=float("nan")),
            expected=["quant.percentile", "finite"]),
    Variant("quant calib zero", setter("quant", "calib_batches", value=0), expected=["quant.calib_batches"]),
    # the launcher
    Variant("cluster kubernetes", setter("launcher", "cluster", value="kubernetes"),
            expected=["launcher.cluster", "'kubernetes'", "['local', 'slurm']"]),
    Variant("slurm key typo", setter("launcher", "slurm", value={"partiton": "gpu"}),
            expected=["launcher.slurm", "'partiton'", "'partition'"]),
    Variant("launcher_file missing", setter("launcher_file", value="profiles/nowhere.yaml"),
            expected=["launcher_file", "'profiles/nowhere.yaml'", "does not exist"]),
    Variant("launcher_file key typo", setter("launcher_file", value="launcher.yaml"),
            files={"launcher.yaml": "cluster: slurm\ntimeout_mins: 60\n"},
            expected=["launcher.yaml", "'timeout_mins'", "'timeout_min'"]),
    Variant("launcher_file slurm typo", setter("launcher_file", value="launcher.yaml"),
            files={"launcher.yaml": "cluster: slurm\nslurm:\n  acount: lab\n"},
            expected=["launcher.slurm", "'acount'", "'account'"]),
    Variant("launcher_file duplicate", setter("launcher_file", value="launcher.yaml"),
            files={"launcher.yaml": "cluster: slurm\npoll_s: 15\ncluster: local\n"},
            expected=["launcher.yaml", "duplicate key 'cluster'", "line 3"]),
    Variant("batch over processes", setter("launcher", "tasks_per_node", value=3),
            expected=["train.batch_size 16", "3 processes", "tasks_per_node"]),
    Variant("scale mem negative", setter("launcher", "scales", value={"tiny": {"mem_gb": -1}}),
            expected=["launcher.scales.tiny.mem_gb"]),
    Variant("scale name typo", setter("launcher", "scales", value={"tinny": {"mem_gb": 4}}),
            expected=["launcher.scales", "'tinny'", "'tiny'"]),
    # duplicate keys, as raw YAML text
    Variant("duplicate defaults key", text=duplicate_line("  seed: 0", "  seed: 1"),
            expected=["duplicate key 'seed'", "line"]),
    Variant("duplicate study", text=duplicate_line("  lr:", "    grid: {block: [op]}\n  lr:"),
            expected=["duplicate key 'lr'"]),
    Variant("duplicate in --configfile", mutate=None, files={"extra.yaml": "max_runs: 100\nmax_runs: 200\n"},
            args=["--configfile", "config.yaml", "extra.yaml"], expected=["extra.yaml", "duplicate key 'max_runs'"]),
]

GOOD = [
    Variant("lr as YAML 1.1 reads 1e-2", text=lambda t: t.replace("lr: 1.0e-2", "lr: 1e-2", 1)),
    Variant("steps as a string", setter("defaults", "train", "steps", value="300")),
    Variant("grid lrs as strings", setter("studies", "lr", "grid", "lr", value=["3e-3", "1e-2"])),
    Variant("a text axis", setter("studies", "lr", "grid", "model.qk_norm", value=["none", "rms"])),
]


def run_variant(v: Variant, root: Path) -> tuple[subprocess.CompletedProcess, Path, float]:
    work = root / re.sub(r"\W+", "-", v.name)
    work.mkdir()
    if v.text is not None:
        (work / "config.yaml").write_text(v.text(BASE_TEXT))
    else:
        config = copy.deepcopy(BASE)
        if v.mutate is not None:
            v.mutate(config)
        (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for name, content in v.files.items():
        (work / name).write_text(content)
    for name in v.dirs:
        (work / name).mkdir(parents=True)
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--profile", str(REPO / "profiles" / "local"), "-n", *v.args]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=work, timeout=300)
    return out, work, time.perf_counter() - start


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, float]]:
    root = tmp_path_factory.mktemp("fuzz")
    with ThreadPoolExecutor(2) as pool:
        futures = {v.name: pool.submit(run_variant, v, root) for v in BAD + GOOD}
    return {name: f.result() for name, f in futures.items()}


def test_there_are_enough_distinct_variants():
    names = [v.name for v in BAD]
    assert len(names) == len(set(names)) >= 40
    assert all(v.expected for v in BAD)


@pytest.mark.parametrize("variant", BAD, ids=lambda v: v.name)
def test_malformed_config_stops_before_any_job_naming_the_key(outcomes, variant):
    out, work, seconds = outcomes[variant.name]
    output = out.stdout + out.stderr
    assert out.returncode != 0, output[-2000:]
    assert "ofe: configuration error:" in out.stderr, output[-2000:]
    for fragment in variant.expected:
        assert fragment in out.stderr, (fragment, out.stderr[-2000:])
    assert "Traceback" not in output
    assert "Job stats" not in output and "rule train" not in output  # nothing was planned, let alone run
    assert not list(work.rglob("runs")) and not (work / PWNED).exists()


def test_the_huge_grid_stops_at_once(outcomes):
    *_, seconds = outcomes["huge grid"]
    _, _, baseline = outcomes["lr text"]  # a variant failing at the same stage
    assert seconds < baseline + 3.0  # counting 10,000,000 grid points, not expanding them (minutes)


@pytest.mark.parametrize("variant", GOOD, ids=lambda v: v.name)
def test_numbers_written_as_strings_and_text_axes_plan(outcomes, variant):
    out, work, _ = outcomes[variant.name]
    output = out.stdout + out.stderr
    assert out.returncode == 0, output[-2000:]
    stats = output.split("Job stats:")[1]
    trains = int(re.search(r"^train\s+(\d+)\s*$", stats, re.M).group(1))
    # a text axis: + pre_ln with qk_norm rms and op with none, at both lrs
    assert trains == {"a text axis": 27}.get(variant.name, 23)
    if variant.name == "grid lrs as strings":
        assert "tiny/pre_ln/beta1/adamw/lr0.003/seed0" in output
