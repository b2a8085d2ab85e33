"""One identity of "the same model" for every cache (lens_core/checkpoint/identity.py): the whole content of every file,
remembered per version of the file, so nothing changed is ever served from a cache and nothing unchanged is hashed
twice."""

import os

import pytest

from lens_core.checkpoint import identity


@pytest.fixture(autouse=True)
def fresh_memo(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp_path / "cache"))
    identity.forget_remembered_hashes()
    yield
    identity.forget_remembered_hashes()


def same_size_and_time(path, data: bytes):
    """Replace `path`'s content in place with `data` (same size) and give it back its modification time (cp -p)."""
    stat = path.stat()
    assert len(data) == stat.st_size
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_any_changed_byte_changes_the_identity_even_at_the_same_size_and_time(tmp_path):
    """A merged LoRA changes a few tensors: a hash of samples may miss it; the whole content does not."""
    path = tmp_path / "big.safetensors"
    data = bytearray(os.urandom(70 << 20))
    path.write_bytes(bytes(data))
    first = identity.file_identity(path)
    data[(70 << 20) // 2 + 12345] ^= 1  # one bit, between any sample windows
    same_size_and_time(path, bytes(data))
    assert identity.file_identity(path) != first


def test_touching_a_file_does_not_change_it(tmp_path):
    path = tmp_path / "a.gguf"
    path.write_bytes(b"GGUF" + bytes(100))
    first = identity.file_identity(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert identity.file_identity(path) == first


def test_an_unchanged_file_is_hashed_once_also_after_a_restart(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    path.write_bytes(os.urandom(1 << 20))
    first = identity.file_identity(path)
    identity.forget_remembered_hashes()  # a new process: the memo comes from the cache folder

    def no_hashing(path):
        raise AssertionError("hashed again")

    monkeypatch.setattr(identity, "_sha256", no_hashing)
    assert identity.file_identity(path) == first


def test_an_unwritable_or_damaged_memo_only_costs_a_rehash(tmp_path, monkeypatch, caplog):
    path = tmp_path / "a.safetensors"
    path.write_bytes(os.urandom(1 << 16))
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LENS_CACHE_DIR", str(blocked))
    first = identity.file_identity(path)
    assert "could not remember file hashes" in caplog.text
    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "file_hashes.json").write_text("{not json")
    identity.forget_remembered_hashes()
    assert identity.file_identity(path) == first


def test_a_model_is_all_its_files_by_name(tmp_path):
    (tmp_path / "m").mkdir()
    weights, config = tmp_path / "m" / "model.safetensors", tmp_path / "m" / "config.json"
    weights.write_bytes(b"weights")
    config.write_text('{"a": 1}')
    first = identity.model_identity([weights, config])
    config.write_text('{"a": 2}')
    assert identity.model_identity([weights, config]) != first
    assert identity.model_identity([weights]) != identity.model_identity([weights, config])


def test_the_text_encoder_is_hashed_at_its_first_cached_prompt_not_at_load(golden, tmp_path, monkeypatch):
    """Loading reads the weights once; hashing a 13 GB file as well would add seconds to every first load of a file."""
    from te_files import golden_te_folder

    from lens_core import load_text_encoder
    from lens_core.text.loader import encoder_files

    hashed = []
    sha256 = identity._sha256
    monkeypatch.setattr(identity, "_sha256", lambda path: hashed.append(path.name) or sha256(path))
    folder = golden_te_folder(golden, tmp_path)
    encoder = load_text_encoder(folder, device="cpu")
    assert hashed == []
    assert encoder.identity == identity.model_identity(encoder_files(folder))
    assert sorted(hashed) == ["config.json", "model-00001-of-00001.safetensors"]
