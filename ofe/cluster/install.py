"""`python -m ofe install-profile`: make `snakemake --profile slurm` work as users type it.

Snakemake 9 resolves a bare profile name only as ./NAME or NAME in its global config folders (the
user's, e.g. ~/.config/snakemake, then the site's /etc/xdg/snakemake), never under this repository's
profiles/. This installs the checkout's SLURM profile there under NAME, with the launcher file given by
its absolute path, so the profile works from the project root. An existing profile is never replaced.
"""

from __future__ import annotations

import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from platformdirs import AppDirs

REPO = Path(__file__).resolve().parents[2]  # ofe/cluster/install.py -> the repository
LAUNCHER_FILE = re.compile(r"(launcher_file=)([^\s'\"#]+)")


def user_profile_dir() -> Path:
    """Snakemake's user-level profile folder (it uses platformdirs' AppDirs('snakemake', 'snakemake'))."""
    return Path(AppDirs("snakemake", "snakemake").user_config_dir)


def render(source: Path, repo: Path) -> str:
    """The profile's config.yaml with every relative launcher_file made absolute (against `repo`)."""
    def absolute(m: re.Match) -> str:
        path = Path(m.group(2))
        return m.group(1) + str(path if path.is_absolute() else (repo / path).resolve())

    header = (f"# Installed by `python -m ofe install-profile` on "
              f"{datetime.now(timezone.utc):%Y-%m-%d} from {source}.\n"
              f"# Edit that file (or this one); reinstall under another name with --name NAME.\n")
    return header + LAUNCHER_FILE.sub(absolute, source.read_text())


def install_profile(name: str = "slurm", source: Path | None = None, repo: Path = REPO,
                    dest_root: Path | None = None) -> Path:
    """Write DEST_ROOT/NAME/config.yaml from the checkout's profiles/slurm; returns that folder.
    Raises FileExistsError, saying what to do instead, if a profile of that name exists."""
    source = source or repo / "profiles" / "slurm" / "config.yaml"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"--name: {name!r} is not a folder name (letters, digits, '_', '.', '-')")
    dest = (dest_root or user_profile_dir()) / name
    if dest.exists():
        raise FileExistsError(
            f"a Snakemake profile named {name!r} already exists at {dest}; it was left as it is.\n"
            f"Install this one under another name (python -m ofe install-profile --name ofe-slurm, then "
            f"snakemake --profile ofe-slurm), or use it by path: snakemake --profile profiles/slurm")
    text = render(source, repo)
    for m in LAUNCHER_FILE.finditer(text):
        if not Path(m.group(2)).exists():
            raise FileNotFoundError(f"{source}: launcher_file {m.group(2)} does not exist")
    # written beside it and renamed into place: never a half-written profile under NAME
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest.parent))
    (tmp / "config.yaml").write_text(text)
    tmp.chmod(0o755)
    tmp.rename(dest)
    return dest
