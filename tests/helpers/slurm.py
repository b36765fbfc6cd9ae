"""A real SLURM for the integration tests: whether one answers, and counting what is submitted to it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

HOW = "start a local cluster with `sudo scripts/slurm-localhost.sh start` (.ci/run does)"


def slurm_up() -> bool:
    """A controller answers and accounting works (submitit reads job states through sacct)."""
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
        acct = subprocess.run(["sacct", "-n", "-X"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return ping.returncode == 0 and "UP" in ping.stdout and acct.returncode == 0


def counting_sbatch(tmp_path: Path) -> tuple[dict[str, str], Callable[[], list[str]]]:
    """(an environment whose PATH starts with an `sbatch` that logs each submission's job name, then runs
    the real sbatch; the names logged so far, one per sbatch call, in order).

    The name is read from the command line (--job-name=, -J) or the submitted script's #SBATCH lines, so
    jobs submitted by processes that inherit the environment (a head job's own submissions) count too.
    A call that named no job logs '?'."""
    real = shutil.which("sbatch")
    if real is None:
        raise FileNotFoundError("sbatch is not on PATH")
    bin_dir, log = tmp_path / "counting-sbatch", tmp_path / "sbatch-calls.txt"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(f"""#!/bin/sh
name=""
prev=""
for a in "$@"; do
    case "$a" in
        --job-name=*) name="${{a#--job-name=}}" ;;
        *) if [ "$prev" = "-J" ] || [ "$prev" = "--job-name" ]; then name="$a"
           elif [ -z "$name" ] && [ -f "$a" ]; then
               name=$(sed -n -e 's/^#SBATCH --job-name=//p' -e 's/^#SBATCH -J *//p' "$a" | head -n 1)
           fi ;;
    esac
    prev="$a"
done
echo "${{name:-?}}" >> '{log}'
exec '{real}' "$@"
""")
    (bin_dir / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def names() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    return env, names
