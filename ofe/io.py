"""Parquet schemas, atomic writes and provenance.

Every file `ofe` writes goes through `atomic_write_*`: the bytes land in a temporary file beside the
target, are flushed to disk, and are renamed over it, so a reader (or Snakemake) never sees a
half-written file, and a power cut or node crash leaves either the old file or the new one.

No pandas or pyarrow at import: the head's waiters (`python -m ofe launch`, one per run in flight) import
this module for its atomic writes, and must stay light (issue 22). The Parquet schemas are built on first
use (`METRIC_SCHEMA`, `QUANT_SCHEMA`: module attributes made by `__getattr__`), and the Parquet functions
import pyarrow when called.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import platform
import secrets
import socket
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

# One row per (step, layer, site, metric) of one run: the long/tidy layout of every metric file.
# layer is -1 for run-level rows (site "train" or "val"); block inputs are layers 0..L-1 and the
# tensor fed to the unembedding is layer L. METRIC_SCHEMA is the pyarrow schema of these (name, type) pairs.
METRIC_FIELDS = (("step", "int64"), ("tokens", "int64"), ("layer", "int64"), ("site", "string"),
                 ("metric", "string"), ("value", "float64"))

METADATA_KEY = b"ofe"  # JSON blob in the Parquet key-value metadata: config + provenance

# ---- int8 tables: one row per (protocol, bits) of a run or checkpoint (quant.parquet) ----------------

QUANT_FIELDS = (("protocol", "string"), ("bits", "int64"), ("ppl_fp", "float64"), ("ppl_q", "float64"),
                ("delta", "float64"))
QUANT_COLUMNS = [name for name, _ in QUANT_FIELDS]
_SCHEMAS = {"METRIC_SCHEMA": METRIC_FIELDS, "QUANT_SCHEMA": QUANT_FIELDS}


def __getattr__(name: str) -> Any:
    """METRIC_SCHEMA and QUANT_SCHEMA, the pyarrow schemas, built (and kept) on first use."""
    if name not in _SCHEMAS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import pyarrow as pa

    schema = pa.schema([(field, getattr(pa, kind)()) for field, kind in _SCHEMAS[name]])
    globals()[name] = schema
    return schema


# What each protocol quantises, in words, for the report
# (`ofe.core.quant._static_sites` is the truth; kept here so the report needs no torch).
QUANTISED_TENSORS = {
    "static_per_tensor": (
        "weights of every linear layer (symmetric, per tensor); activations (asymmetric, per tensor, static "
        "ranges) at the input and output of every linear layer (Q, K and V after their bias), the attention "
        "scores and probabilities, every norm's output, both residual sums of every block (the stream "
        "entering block 0 is the embeddings sum), the stream entering the unembedding; the tied LM head "
        "stays in full precision, and so do the embedding projections of model.embed_proj (OSP merges them "
        "into the embedding and the head)"
    ),
    "dynamic_per_token": (
        "weights of every linear layer (symmetric, per output channel); the input of every linear layer "
        "(symmetric, one dynamic range per token); nothing else (the embedding projections of "
        "model.embed_proj stay in full precision)"
    ),
    "torchao_dynamic": (
        "the same tensors as dynamic per-token, with real int8 kernels (torchao's "
        "Int8DynamicActivationInt8WeightConfig: int8 x int8 matmuls accumulated in int32): weights of every "
        "linear layer (per output channel, absmax) and their inputs (one dynamic range per token), 8 bits only"
    ),
}

# What each protocol quantises on a transformers model, in words (the metadata and docs/inspect.md carry it;
# `ofe.pretrained.quant.static_sites` is the truth).
HF_QUANTISED_TENSORS = {
    "static_per_tensor": (
        "weights of every linear layer (nn.Linear and GPT-2's Conv1D; symmetric, per tensor) except the "
        "LM head; activations (asymmetric, per tensor, static ranges calibrated on separate batches) at "
        "the input and output of every such linear layer, every LayerNorm/RMSNorm output, the residual "
        "stream entering and leaving every decoder layer (the stream entering layer 0 is the embeddings), "
        "and the attention scores (before the mask) and probabilities where the self-check passes"
    ),
    "dynamic_per_token": (
        "weights of every linear layer except the LM head (symmetric, per output channel); the input of "
        "every linear layer (symmetric, one dynamic range per token); nothing else"
    ),
    "torchao_dynamic": (
        "the same tensors as dynamic per-token (GPT-2's Conv1D turned into nn.Linear first), with torchao's "
        "real int8 kernels: absmax weights per output channel, inputs per token, 8 bits only"
    ),
}
HF_NOT_QUANTISED = (
    "the LM head and the logits; the input embeddings; the residual sum inside a decoder layer between "
    "its attention and MLP branches (not visible from outside the layer; GPT-NeoX's parallel blocks have "
    "none); rotary-embedded queries and keys; attention scores and probabilities where the model's "
    "attention does not go through the AttentionInterface or ofe's transcription does not reproduce it"
)

LIBRARIES = ("torch", "numpy", "pandas", "pyarrow", "datasets", "submitit", "snakemake", "altair")


@contextlib.contextmanager
def atomic_path(path: Path, previous: Path | None = None) -> Iterator[Path]:
    """Yield a temp path in the target's folder; rename it over `path` only if the body succeeds.

    The temp file is fsynced before the rename (else a crash can leave the new name pointing at an
    empty or partial file) and the folder after it (else the rename itself can be lost). With
    `previous`, the file being replaced is kept under that name first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        _fsync_file(tmp)
        if previous is not None and path.exists():
            _keep_previous(path, Path(previous))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some network filesystems cannot sync a folder; the rename still happened
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _keep_previous(path: Path, previous: Path) -> None:
    """Make `previous` a second name of the current `path`. A hard link, renamed into place, keeps
    `path` present throughout (a reader never finds it missing); a filesystem without hard links
    rotates by rename instead, which leaves only `previous` until the new file is renamed in."""
    link = previous.parent / f".{previous.name}.{secrets.token_hex(4)}.tmp"
    try:
        os.link(path, link)
    except OSError:
        os.replace(path, previous)
        return
    os.replace(link, previous)


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text)


def finite_or_none(obj: Any) -> Any:
    """`obj` with every NaN or infinite float (in nested dicts, lists and tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def atomic_write_json(path: Path | str, obj: Any) -> None:
    """Strict JSON: Python's NaN/Infinity tokens are not JSON, and strict parsers (browsers, jq, most
    languages' libraries) reject the whole file, so non-finite numbers are written as null."""
    text = json.dumps(finite_or_none(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
    atomic_write_text(path, text + "\n")


def atomic_torch_save(obj: Any, path: Path | str, previous: Path | str | None = None) -> None:
    import torch

    with atomic_path(Path(path), Path(previous) if previous is not None else None) as tmp:
        torch.save(obj, tmp)


def write_parquet(
    df: pd.DataFrame, path: Path | str, schema: pa.Schema | None = None, metadata: dict | None = None
) -> None:
    """Write `df` atomically with an explicit schema; `metadata` lands as JSON under the key `ofe`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    if metadata is not None:
        meta = dict(table.schema.metadata or {})
        meta[METADATA_KEY] = json.dumps(metadata, sort_keys=True, default=str).encode()
        table = table.replace_schema_metadata(meta)
    with atomic_path(Path(path)) as tmp:
        pq.write_table(table, tmp)


def read_metadata(path: Path | str) -> dict:
    """The `ofe` JSON metadata of a Parquet file written by `write_parquet` ({} if none)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def git_revision(cwd: Path | str | None = None) -> dict:
    """The git commit of the code and whether the tree had uncommitted changes."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=cwd,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        return {"revision": None, "dirty": None}
    return {"revision": rev, "dirty": dirty}


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed version of each package in `names` (None where it is not installed)."""
    import importlib.metadata  # here: a quarter of a second to import, on every waiting rule otherwise

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance() -> dict:
    """Git revision, library versions, machine and date: attached to every result file."""
    return {**_static_provenance(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


@functools.lru_cache(maxsize=1)
def _static_provenance() -> dict:
    """The part that cannot change within a process (git and metadata look-ups cost ~0.1 s)."""
    return {
        "git": git_revision(),
        "libraries": library_versions(),
        "python": platform.python_version(),
        "machine": {"host": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count()},
    }
