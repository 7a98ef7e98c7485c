"""The hashes integrity records and checks are fsutil.file_sha256's: one sha256 of a file in the package."""

import hashlib

import pytest

from collegeadvisor import fsutil, integrity
from collegeadvisor.errors import ManifestError


def test_one_file_hash_for_writing_and_checking(tmp_path):
    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    big = bytes(range(256)) * 5000  # over one 1 MB block
    (folder / "weights.safetensors").write_bytes(big)
    (folder / "sub" / "config.json").write_text("{}")
    hashes = integrity.file_hashes(folder)
    assert hashes == {"sub/config.json": hashlib.sha256(b"{}").hexdigest(),
                      "weights.safetensors": hashlib.sha256(big).hexdigest()}
    assert hashes["weights.safetensors"] == fsutil.file_sha256(folder / "weights.safetensors")
    assert integrity.file_sha256 is fsutil.file_sha256 and not hasattr(integrity, "sha256_of")
    integrity.verify_hashes(folder, hashes, tmp_path)
    (folder / "weights.safetensors").write_bytes(big[:-1] + b"x")
    with pytest.raises(ManifestError, match="sha256 differs"):
        integrity.verify_hashes(folder, hashes, tmp_path)
