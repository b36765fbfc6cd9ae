"""Checkpoint studies: a study that lists pretrained checkpoints instead of a training grid.

    studies:
      pythia:
        models:
          - name: EleutherAI/pythia-160m
            revisions: [step1000, step8000, step143000]
          - name: /data/models/my-run      # a local save_pretrained folder: one checkpoint
            step: 5000                     # its training step, where the name does not carry it

Each (model, revision) is one checkpoint, measured by one `ofe inspect` job (`ofe.cluster.launch.launch_inspect`)
into RESULTS/checkpoints/<ckpt_id>/; the top-level `inspect:` section says on how much data, the `data:`
section on which corpus (tokenised with each model's own tokenizer), `quant:` which int8 protocols.

Checked here, before any job starts (each message names the key): a local path exists and is a
save_pretrained folder, revisions only for hub names, `step` only where one checkpoint is meant, and
no two different checkpoints share a folder. Whether a hub revision exists is only known on the hub,
so that is checked by the job, which names the model and revision when it is not there. In offline
mode (HF_HUB_OFFLINE=1) a hub model at a revision not in the local cache is refused here
(`ofe.plan.offline`), naming the key and the `hf download` command that fills the cache.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from ofe.config import ConfigError
from ofe.plan import offline

SAFE = re.compile(r"[^A-Za-z0-9._-]+")
STEP = re.compile(r"step[-_]?(\d+)")  # Pythia's revisions: step0 ... step143000
# Settings of the `inspect:` section (`ofe.pretrained.inspection.Settings` plus the job's resources) and defaults.
INSPECT_DEFAULTS = {"batches": 4, "batch_size": 8, "context": None, "threads": 1,
                    "mem_gb": None, "cpus_per_task": None, "timeout_min": None}


def is_checkpoint_study(spec: dict[str, Any]) -> bool:
    return isinstance(spec, dict) and "models" in spec


def revision_step(revision: str | None) -> int | None:
    """The training step a revision name carries ('step1000' -> 1000), None where it carries none."""
    m = STEP.fullmatch(revision or "")
    return int(m.group(1)) if m else None


def looks_like_path(name: str) -> bool:
    """Whether `name` can only be meant as a path: a hub name is "model" or "org/model" (`ofe.pretrained.hf` reads
    names the same way; here, not there, so that planning imports neither torch nor transformers)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def is_local(name: str) -> bool:
    """A local folder (as `ofe.pretrained.hf` loads it: an existing folder wins over a hub name of the same
    spelling)."""
    return looks_like_path(name) or Path(name).expanduser().is_dir()


def label(name: str) -> str:
    """A model's short display name: the hub name, or a local folder's own name."""
    return Path(name).expanduser().resolve().name if is_local(name) else name


def _slug(text: str) -> str:
    return SAFE.sub("_", text).strip("._") or "_"


def ckpt_id(name: str, revision: str | None) -> str:
    """The checkpoint's folder under RESULTS/checkpoints: `org--model/revision` for a hub name (the hub
    cache's spelling), `folder-name/local` for a local folder."""
    model = _slug(label(name)) if is_local(name) else "--".join(_slug(p) for p in name.split("/"))
    return f"{model}/{_slug(revision) if revision else ('local' if is_local(name) else 'main')}"


def count(spec: dict[str, Any]) -> int:
    """Checkpoints a study lists (for the grid-size limit), without checking them."""
    models = spec.get("models") if isinstance(spec, dict) else None
    if not isinstance(models, list):
        return 0
    return sum(len(m.get("revisions") or [None]) if isinstance(m, dict) else 1 for m in models)


def _entry_errors(key: str, entry: dict[str, Any]) -> list[str]:
    name, revisions = entry["name"], entry.get("revisions")
    if is_local(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            return [f"{key}.name: {name!r} is no folder; pass a save_pretrained folder that exists, or a hub "
                    "name such as EleutherAI/pythia-160m"]
        if not (folder / "config.json").exists():
            return [f"{key}.name: {name!r} has no config.json; pass a folder written by save_pretrained"]
        if revisions:
            return [f"{key}.revisions: revisions name hub branches or tags, and {name!r} is a local folder; "
                    "drop revisions (one checkpoint per folder)"]
    if entry.get("step") is not None and len(revisions or [None]) > 1:
        return [f"{key}.step: one step for {len(revisions)} revisions; give each checkpoint its own entry, "
                "or use revisions that carry their step (step1000)"]
    if len(set(revisions or [])) != len(revisions or []):
        return [f"{key}.revisions: {revisions} lists a revision twice"]
    return []


def expand(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every checkpoint of every checkpoint study, in config order, each once (a checkpoint listed by two
    studies is one job). ConfigError naming the key for what `check` refuses."""
    out: dict[str, dict[str, Any]] = {}
    errors = []
    for study, spec in config["studies"].items():
        if not is_checkpoint_study(spec):
            continue
        for i, entry in enumerate(spec["models"]):
            key = f"studies.{study}.models[{i}]"
            if problems := _entry_errors(key, entry):
                errors += problems
                continue
            for revision in entry.get("revisions") or [None]:
                cid = ckpt_id(entry["name"], revision)
                step = entry.get("step") if entry.get("step") is not None else revision_step(revision)
                if not is_local(entry["name"]) and (problem := offline.check_checkpoint(
                        f"{key}.name" if revision is None else f"{key}.revisions", entry["name"], revision)):
                    errors.append(problem)
                    continue
                item = {"ckpt_id": cid, "model": entry["name"], "label": label(entry["name"]),
                        "revision": revision, "step": step, "order": len(out), "studies": [study]}
                first = out.get(cid)
                if first is None:
                    out[cid] = item
                elif (first["model"], first["revision"]) == (item["model"], revision) and first["step"] != step:
                    errors.append(f"{key}: {entry['name']!r} at {revision or 'its only revision'} is given step "
                                  f"{step} here and {first['step']} in studies {first['studies']}; give it one step")
                elif (first["model"], first["revision"]) != (item["model"], revision):
                    errors.append(f"{key}: {entry['name']!r} at {revision or 'its only revision'} would share the "
                                  f"folder checkpoints/{cid} with {first['model']!r} at "
                                  f"{first['revision'] or 'its only revision'} (studies {first['studies']}); "
                                  "rename one of the folders")
                elif study not in first["studies"]:
                    first["studies"].append(study)
    if out and importlib.util.find_spec("transformers") is None:
        errors.append("studies: checkpoint studies load models with transformers, which is not installed; "
                      "pip install -e '.[hf]'")
    if errors:
        raise ConfigError("\n".join(f"config.yaml: {e}" for e in errors))
    return list(out.values())


def inspect_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The `inspect:` section with its defaults (the schema has checked its types and ranges)."""
    return {**INSPECT_DEFAULTS, **(config.get("inspect") or {})}


# The settings that shape an inspection's numbers: a change reruns it. Threads and resources do not.
MEASURE = ("batches", "batch_size", "context")


def measure_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: settings[k] for k in MEASURE}


def job_spec(ckpt: dict[str, Any]) -> dict[str, Any]:
    """What an inspection job needs of a planned checkpoint (not the studies listing it, or its order)."""
    return {k: ckpt[k] for k in ("ckpt_id", "model", "revision", "step")}


def job_resources(settings: dict[str, Any]) -> dict[str, Any]:
    """What an inspection job asks the launcher for: the section's resources where set."""
    return {k: settings[k] for k in ("mem_gb", "cpus_per_task", "timeout_min") if settings.get(k) is not None}
