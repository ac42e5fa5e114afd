"""Atomic writes: a file (or a folder) either appears whole or not at all; and the
sha256 of a file, with which downloads and conversions are checked.

Write to a temporary name in the same directory, flush and fsync, then os.replace, which
is atomic on POSIX within a filesystem. An interrupted run leaves at most a stray
temporary (named .*.tmp-*) and never a half-written file under the real name.
"""
from __future__ import annotations

import contextlib
import errno
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
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if e.filename is None or e.filename == tmp:      # name the file meant, not the temporary
            raise OSError(e.errno, e.strerror, path) from None
        raise
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
def atomic_dir(path: str):
    """Yields a temporary sibling folder; when the body succeeds its files are synced and
    it is renamed to `path` (one rename: the folder appears whole or not at all). `path`
    must not exist: replacing a folder takes two renames, and a kill between them would
    leave neither (minilars.runs keeps versioned checkpoint folders instead)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path):
        raise FileExistsError(errno.EEXIST, "already exists", path)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())      # mkdtemp makes it 0700; give it normal folder rights
    try:
        yield tmp
        for name in os.listdir(tmp):
            full = os.path.join(tmp, name)
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        os.rename(tmp, path)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                               # some filesystems refuse fsync on a folder
    finally:
        os.close(fd)


def sha256_of_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
