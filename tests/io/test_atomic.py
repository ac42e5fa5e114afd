"""io.atomic: whole files or none, and the checksum helper."""
import hashlib
import os

from minilars.io.atomic import sha256_of_file, write_bytes


def test_write_bytes_leaves_no_temp_files(tmp_path):
    write_bytes(tmp_path / "sub" / "f.bin", b"abc")
    write_bytes(tmp_path / "sub" / "f.bin", b"abcd")
    assert os.listdir(tmp_path / "sub") == ["f.bin"]
    assert (tmp_path / "sub" / "f.bin").read_bytes() == b"abcd"


def test_sha256_of_file_matches_hashlib_across_chunks(tmp_path):
    data = bytes(range(256)) * 9000          # > 2 MiB: several 1 MiB chunks
    write_bytes(tmp_path / "f.bin", data)
    assert sha256_of_file(tmp_path / "f.bin") == hashlib.sha256(data).hexdigest()
