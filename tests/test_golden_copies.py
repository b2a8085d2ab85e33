"""The reference tensors shipped in tests/golden are byte-identical to the shared set they were copied from.

Their README is the repository's own (it points at the repository's documentation), so it is not compared."""

import hashlib

import pytest
from conftest import SHARED_GOLDEN, SHIPPED_GOLDEN


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "README.md"}


def test_shipped_copies_match_the_shared_goldens():
    if not SHARED_GOLDEN.is_dir():
        pytest.skip(f"no shared goldens at {SHARED_GOLDEN} to compare the shipped copies with (a plain clone)")
    assert _digests(SHIPPED_GOLDEN) == _digests(SHARED_GOLDEN), (
        f"tests/golden differs from {SHARED_GOLDEN}: copy the shared files over (cp {SHARED_GOLDEN}/* tests/golden/)")
