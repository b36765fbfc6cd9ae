"""A job that reports the environment it was started with, for tests/integration/test_launch.py. In a
module of its own, under tests/helpers/: the job's process unpickles it by module path
(tests.helpers.launch_probe), importable wherever the repository's root is on sys.path."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import submitit

from ofe.cluster.jobs import export_processes


class EnvProbe(submitit.helpers.Checkpointable):
    """Each task writes RUN/env<LOCAL_RANK>.json: its LOCAL_RANK and CUDA_VISIBLE_DEVICES (None: unset),
    after the same process setup as a training job (`ofe.cluster.jobs.export_processes`)."""

    def __call__(self, out: str) -> dict[str, Any]:
        export_processes()
        seen = {"local_rank": os.environ.get("LOCAL_RANK"), "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
        Path(out, f"env{os.environ.get('LOCAL_RANK', '0')}.json").write_text(json.dumps(seen))
        return seen
