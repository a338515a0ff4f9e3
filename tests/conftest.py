"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real-data directory from ``DYNSPARSE_TEST_DATA``; tests that use it are skipped when it
    is unset (the default), so a bare ``pytest`` never needs data or network."""
    root = os.environ.get("DYNSPARSE_TEST_DATA")
    if not root:
        pytest.skip("set DYNSPARSE_TEST_DATA to a data directory to run real-data tests")
    return Path(root)
