"""Shared fixtures: the package from this checkout, and the C library (fused_moe._lib)."""

import os
import sys

import pytest

PYTHON_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if PYTHON_ROOT not in sys.path:
    sys.path.insert(0, PYTHON_ROOT)

from fused_moe import _lib  # noqa: E402
from fused_moe._errors import LibraryNotFoundError  # noqa: E402

HEADER = os.path.join(os.path.dirname(PYTHON_ROOT), "Sources", "FusedMoEC", "include", "fused_moe.h")


@pytest.fixture(scope="session")
def lib():
    """The loaded library. Skips when it is not built, unless FUSED_MOE_LIBRARY names it (CI does):
    then failing to load it is an error, so that CI cannot pass without running the ABI tests."""
    try:
        return _lib.load()
    except LibraryNotFoundError as error:
        if os.environ.get(_lib.LIBRARY_ENV):
            raise
        pytest.skip(f"libFusedMoEC is not built: {error}")


@pytest.fixture(scope="session")
def header_path():
    return HEADER
