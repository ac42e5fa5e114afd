"""Atomic writes: a file (or a folder) either appears whole or not at all; and the
sha256 of a file, with which downloads and conversions are checked.

Write to a temporary name in the same directory, flush and fsync, then os.replace, which
is atomic on POSIX within a filesystem. An interrupted run leaves at most a stray
temporary (named .*.tmp-*) and never a half-written file under the real name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path to write to; on success it is renamed to `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())      # mkstemp makes it 0600; give it normal file rights
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(os.fspath(path)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str, replace: bool = False):
    """Yields a temporary sibling folder; on success it becomes `path`. With replace=True an
    existing folder is swapped out (old one removed after the rename)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())      # mkdtemp makes it 0700; give it normal folder rights
    try:
        yield tmp
        for name in os.listdir(tmp):
            full = os.path.join(tmp, name)
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    os.fsync(f.fileno())
        if os.path.exists(path):
            if not replace:
                raise FileExistsError(f"{path} already exists")
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_of_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
