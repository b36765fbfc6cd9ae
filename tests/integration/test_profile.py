"""`python -m ofe install-profile` makes the literal `snakemake --profile slurm` work from the project
root, never overwrites a profile, and `--profile profiles/slurm` keeps working."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.workflow import SNAKEMAKE

pytestmark = pytest.mark.slow  # starts processes: `python -m ofe` and Snakemake processes


@pytest.fixture
def home(tmp_path) -> dict:
    """An environment whose HOME is a fresh folder (Snakemake looks for global profiles under it)."""
    env = {k: v for k, v in os.environ.items() if k != "XDG_CONFIG_HOME"}
    return {**env, "HOME": str(tmp_path)}


def ofe(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ofe", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


def test_install_profile_writes_an_absolute_launcher_path(home, tmp_path):
    out = ofe(home, "install-profile")
    assert out.returncode == 0, out.stderr
    installed = tmp_path / ".config" / "snakemake" / "slurm" / "config.yaml"
    text = installed.read_text()
    paths = re.findall(r"launcher_file=(\S+)", text)
    assert paths == [str(REPO / "profiles" / "slurm" / "launcher.yaml")]
    assert Path(paths[0]).is_file()
    # everything else is the checkout's profile as it is
    assert text.endswith((REPO / "profiles" / "slurm" / "config.yaml").read_text().replace(
        "launcher_file=profiles/slurm/launcher.yaml", f"launcher_file={paths[0]}"))


def test_an_existing_profile_is_never_overwritten(home, tmp_path):
    mine = tmp_path / ".config" / "snakemake" / "slurm"
    mine.mkdir(parents=True)
    (mine / "config.yaml").write_text("cores: 1\n")
    out = ofe(home, "install-profile")
    assert out.returncode == 1
    assert "already exists" in out.stderr and "--name" in out.stderr and "--profile profiles/slurm" in out.stderr
    assert (mine / "config.yaml").read_text() == "cores: 1\n"
    other = ofe(home, "install-profile", "--name", "ofe-slurm")
    assert other.returncode == 0, other.stderr
    assert (tmp_path / ".config" / "snakemake" / "ofe-slurm" / "config.yaml").exists()


@pytest.mark.parametrize("profile", ["slurm", "profiles/slurm"])
def test_snakemake_finds_the_profile_as_users_type_it(home, profile):
    if profile == "slurm":
        assert ofe(home, "install-profile").returncode == 0
    out = subprocess.run([SNAKEMAKE, "--profile", profile, "-n"], cwd=REPO, env=home, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "training jobs go to slurm" in out.stderr
