"""Shared fixtures: where the goldens are, and tiny random models written in the real file formats."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GOLDEN = ROOT.parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden tensors not found at {GOLDEN} (they ship with the development checkout only)")
    return GOLDEN


@pytest.fixture(autouse=True)
def _private_prompt_cache(tmp_path_factory, monkeypatch):
    """Keep the on-disk prompt cache of every test out of the user's home folder."""
    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lens_cache"))
