"""Offline compute nodes: what planning refuses when the Hugging Face libraries may not download.

With HF_HUB_OFFLINE=1 (transformers' and huggingface_hub's switch; TRANSFORMERS_OFFLINE=1 is its older
spelling) a job can only load what is already in the local Hugging Face cache, and with
HF_DATASETS_OFFLINE=1 (which defaults to HF_HUB_OFFLINE) the same holds for datasets. So, in offline
mode, planning refuses before any job starts, naming the key and the command that fills the cache on a
machine with network:

- a `data.tokenizer` hub name not in the cache (`ofe.plan.vocab`);
- a `data.source: datasets` hub dataset not in the cache (`check_dataset`): a `data.path` that is
  neither a local path nor one of datasets' file builders (text, json, csv, parquet, ...);
- a checkpoint study's hub model at a revision not in the cache (`check_checkpoint`).

Online, none of this applies: a name not cached passes planning and the job downloads it.

Only local look-ups: the environment, the cache folders and `huggingface_hub.try_to_load_from_cache`;
never the network, and nothing imported here imports torch or datasets. The environment is read at
each call, not at import as huggingface_hub does, so the cache a plan checks is the one a job started
with the same environment will use.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub.constants.ENV_VARS_TRUE_VALUES
# datasets' packaged builders (datasets.packaged_modules): they read the files they are given, local or
# remote, and are no hub dataset themselves.
FILE_BUILDERS = frozenset({"csv", "json", "pandas", "parquet", "arrow", "text", "conll", "imagefolder",
                           "audiofolder", "videofolder", "meshfolder", "pdffolder", "niftifolder",
                           "webdataset", "xml", "sql", "generator", "spark", "cache"})


def _env_true(var: str) -> bool:
    return (os.environ.get(var) or "").upper() in TRUE


def hub_offline_var() -> str | None:
    """The variable that puts transformers and huggingface_hub offline here ("HF_HUB_OFFLINE=1"), or None
    when they may download. huggingface_hub's own flag counts too where it was set at its import."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _env_true(var):
            return f"{var}={os.environ[var]}"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and getattr(constants, "HF_HUB_OFFLINE", False) and "HF_HUB_OFFLINE" not in os.environ:
        return "HF_HUB_OFFLINE=1"
    return None


def datasets_offline_var() -> str | None:
    """As `hub_offline_var`, for datasets: HF_DATASETS_OFFLINE where set, else HF_HUB_OFFLINE (datasets.config)."""
    value = os.environ.get("HF_DATASETS_OFFLINE")
    if value is not None:
        return f"HF_DATASETS_OFFLINE={value}" if value.upper() in TRUE else None
    return hub_offline_var()


def hf_home() -> Path:
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser()


def hub_cache() -> Path:
    """The hub cache a job started now would use (huggingface_hub.constants.HF_HUB_CACHE)."""
    value = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(os.path.expandvars(value)).expanduser() if value else hf_home() / "hub"


def datasets_cache() -> Path:
    """The datasets cache a job started now would use (datasets.config.HF_DATASETS_CACHE)."""
    value = os.environ.get("HF_DATASETS_CACHE")
    return Path(os.path.expandvars(value)).expanduser() if value else hf_home() / "datasets"


def not_cached(key: str, name: str, var: str, fill: str) -> str:
    return (f"{key}: {name!r} is not in the local Hugging Face cache and {var} forbids downloading it; "
            f"fill the cache on a machine with network ({fill}) and make it visible here (HF_HOME; the hub "
            f"cache here is {hub_cache()}), or unset {var.split('=')[0]} where the network is reachable")


def tokenizer_fill_command(name: str) -> str:
    return (f"python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained({name!r})\" "
            f"or hf download {name}")


def dataset_fill_command(path: str, name: str | None, split: str | None) -> str:
    args = ", ".join([repr(path), *([repr(name)] if name else []), *([f"split={split!r}"] if split else [])])
    return f"python -c \"import datasets; datasets.load_dataset({args})\""


def model_fill_command(name: str, revision: str | None) -> str:
    return f"hf download {name}" + (f" --revision {revision}" if revision else "")


# ---- datasets -----------------------------------------------------------------------------------------

def is_hub_dataset(path: str | None) -> bool:
    """Whether `load_dataset(path, ...)` reads a dataset from the hub (else: a local folder or script, or a
    file builder reading `data_files`)."""
    return bool(path) and path not in FILE_BUILDERS and not os.path.exists(os.path.expanduser(path))


def _snake(name: str) -> str:  # datasets.naming.camelcase_to_snakecase: its cache folders' spelling
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name).lower()


def dataset_cached(path: str) -> bool:
    """Whether hub dataset `path` has files in the hub cache or a prepared copy in the datasets cache (where
    datasets' offline mode looks)."""
    snapshots = hub_cache() / ("datasets--" + path.replace("/", "--")) / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    parts = path.split("/")
    for last in dict.fromkeys([_snake(parts[-1]), parts[-1]]):
        folder = datasets_cache() / "___".join([*parts[:-1], last])
        if folder.is_dir() and any(p.is_dir() for p in folder.glob("*/*/*")):
            return True
    return False


def check_dataset(source: str, path: str | None, name: str | None = None, split: str | None = None) -> str | None:
    """The error for a hub dataset not cached while datasets is offline, naming data.path; else None."""
    var = datasets_offline_var()
    if var is None or source != "datasets" or not is_hub_dataset(path) or dataset_cached(path):
        return None
    return not_cached("data.path", path, var, dataset_fill_command(path, name, split))


# ---- checkpoint studies -------------------------------------------------------------------------------

def model_cached(name: str, revision: str | None) -> bool:
    """Whether hub model `name` at `revision` (None: main) has its config.json in the hub cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # no huggingface_hub, no transformers: `ofe.plan.studies` says how to install it
        return True
    try:
        found = try_to_load_from_cache(name, "config.json", cache_dir=str(hub_cache()), revision=revision)
    except ValueError:  # not a valid repo id: the job names the model
        return True
    return isinstance(found, str)


def check_checkpoint(key: str, name: str, revision: str | None) -> str | None:
    """The error for a hub model (at `revision`) not cached while the hub is offline, naming `key`; else None."""
    var = hub_offline_var()
    if var is None or model_cached(name, revision):
        return None
    what = f"{name}@{revision}" if revision else name
    return not_cached(key, what, var, model_fill_command(name, revision))
