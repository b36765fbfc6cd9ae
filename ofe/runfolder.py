"""A run folder's file names, said once (RESULTS/runs/<run_id>/, and a checkpoint study's
RESULTS/checkpoints/<ckpt_id>/, which an inspection fills with the same tables).

Training writes its checkpoints, then metrics.parquet, then summary.json (last: it marks the run
finished); quantising a finished run writes quant.parquet (rows kept in quant.partial.json meanwhile);
the head that launches the job writes config.json, job.json and, when the job fails, error.txt, and
holds .launch.lock while it waits. Files of another config are moved aside into stale/. No torch here.
"""

from __future__ import annotations

CHECKPOINT, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"  # the resumable state, and the one before it
SHARDED, SHARDED_PREV = "checkpoint.dcp", "checkpoint.prev.dcp"  # the same, as an fsdp run's sharded folders
METRICS, SUMMARY = "metrics.parquet", "summary.json"  # what a run measured; its summary (written last)
QUANT, QUANT_PARTIAL = "quant.parquet", "quant.partial.json"  # int8 rows; those measured so far
INSPECT = "inspect.json"  # a finished inspection's summary (`ofe inspect`; written last)
CONFIG = "config.json"  # the run's config, as the job reads it
JOB, ERROR, LOCK = "job.json", "error.txt", ".launch.lock"  # the submitted job; its failure; the head's lock
STALE = "stale"  # the folder files of another config are moved aside into
