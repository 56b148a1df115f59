"""Shared fixtures: where ``../shared`` lies, and whether its absence is a failure (CI) or a skip (elsewhere)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    return Path(os.environ.get("HMS_SHARED_DIR", REPO_ROOT.parent / "shared")).resolve()


def require_shared(*parts: str) -> Path:
    """Return ``shared/<parts>``; fail when ``HMS_REQUIRE_SHARED=1`` and it is missing, else skip the test."""
    path = _shared_dir().joinpath(*parts)
    if not path.exists():
        message = f"{path} not found (set HMS_SHARED_DIR or place the shared folder beside the repository)"
        if os.environ.get("HMS_REQUIRE_SHARED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return require_shared()


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    return require_shared("data")


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return require_shared("parity")
