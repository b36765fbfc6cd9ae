"""A system service a test needs (a SLURM cluster, a browser): skip without it, but fail under CI."""

from __future__ import annotations

import os

import pytest


def require_service(available: bool, what: str, how: str) -> None:
    """Skip when a system service a test needs is absent, saying how to enable it; under CI (CI=true,
    where .ci/run starts every service) fail instead: in CI no test may skip."""
    if available:
        return
    message = f"{what} is not available: {how}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
