"""The repository stands on its own: no tracked file points at a team-only folder or notes file that a
user who clones the repository does not have. The science lives in docs/science.md."""

from __future__ import annotations

import subprocess

from tests.helpers import REPO

# Spelt in pieces so that this file does not match itself.
FORBIDDEN = ("../" + "shared", "PAPER" + ".md", "CPU-CALIBRATION" + ".md", "SLURM-NOTES" + ".md",
             "ARCHITECTURE" + ".md", "DEVELOPERS" + ".md")


def test_no_tracked_file_refers_to_files_outside_the_repository() -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    offenders = []
    for name in filter(None, files.decode().split("\0")):
        path = REPO / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary files (figures) cannot cite anything
        offenders += [f"{name}: {word}" for word in FORBIDDEN if word in text]
    assert not offenders, "\n".join(offenders)


def test_the_science_document_exists_and_cites_the_paper() -> None:
    text = (REPO / "docs" / "science.md").read_text(encoding="utf-8")
    assert "Understanding and Minimising Outlier Features" in text and "2405.19279" in text
    for section in ("1. Metrics", "2. Blocks", "3. Optimisers", "5. int8"):
        assert section in text
