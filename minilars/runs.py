"""A run folder that survives a pulled power cable, a full SD card and a second writer.

RUN_DIR/
  run.json                  the options, and every change a --resume made to them
  log.jsonl                 one whole line per step; resume cuts it back to the checkpoint
  .lock                     held (flock) by the one process writing here; the OS drops it
                            when that process dies, however it dies
  checkpoints/step-000020/  complete checkpoints: each is built as a hidden temporary
                            folder and renamed into place only when every file in it is
                            written and synced, so a step-* folder is always whole

A save is: build checkpoints/.step-N.*.tmp -> one rename to step-N (the switch: the
newest step folder is the run's checkpoint) -> delete the older step folders. A kill
between any two filesystem operations leaves the previous checkpoint, or the new one
complete, and the next start deletes what the kill left (temporaries, old folders).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time

from minilars.config import read_json_file
from minilars.io.atomic import atomic_dir, write_json, write_text

CHECKPOINTS = "checkpoints"
LOCK = ".lock"
RUN_JSON = "run.json"
LOG = "log.jsonl"
LEGACY_CHECKPOINT = "checkpoint"          # the single folder of minilars before versioned checkpoints
_STEP_FOLDER = re.compile(r"step-(\d+)")
# the temporaries atomic writes of our files leave when killed (io.atomic: .NAME.*.tmp)
_OUR_TEMPORARIES = (f".{RUN_JSON}.", ".summary.json.", f".{LEGACY_CHECKPOINT}.")


class RunError(ValueError):
    """A run folder that cannot be used as asked; the message names the folder."""


# ----------------------------------------------------------------------------- one writer

@contextlib.contextmanager
def run_lock(run_dir: str):
    """Hold RUN_DIR/.lock for the body: an OS file lock (flock), so a crash releases it.
    A second writer is refused at once with the holder's pid, host and start time."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise RunError(f"{run_dir} is in use by {_holder(fd)}; one process writes a run "
                           "folder at a time (wait for it, or use another --out)") from None
        me = (f"pid {os.getpid()} on {socket.gethostname()}, since "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode()
        os.pwrite(fd, me, 0)                  # write, then cut: never an empty file
        os.ftruncate(fd, len(me))
        yield
    finally:
        os.close(fd)                      # closing the descriptor releases the lock


def _holder(fd: int) -> str:
    """Who holds the lock, as it wrote itself into the file (it may be a moment behind
    taking the lock: wait up to a second for it)."""
    for _ in range(20):
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return "another process"


# ----------------------------------------------------------------------------- run.json

def read_run_json(run_dir: str) -> dict:
    """run.json as a dict; a missing, unreadable or malformed file names itself."""
    path = os.path.join(run_dir, RUN_JSON)
    options = read_json_file(path, RunError, missing=f"no {RUN_JSON} there (not a run folder?)")
    if not isinstance(options, dict):
        raise RunError(f"{path}: expected a JSON object of options, found "
                       f"{type(options).__name__}")
    return options


def write_run_json(run_dir: str, options: dict) -> None:
    write_json(os.path.join(run_dir, RUN_JSON), options)


def holds_a_run(run_dir: str) -> bool:
    return (os.path.exists(os.path.join(run_dir, RUN_JSON))
            or bool(_step_folders(run_dir)) or _legacy(run_dir) is not None)


# ----------------------------------------------------------------------------- checkpoints

def _step_folders(run_dir: str) -> dict[int, str]:
    """{step: folder} of the complete checkpoints (hidden temporaries are not listed)."""
    root = os.path.join(run_dir, CHECKPOINTS)
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return {}
    found = {}
    for name in names:
        match = _STEP_FOLDER.fullmatch(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found[int(match.group(1))] = os.path.join(root, name)
    return found


def _legacy(run_dir: str) -> str | None:
    folder = os.path.join(run_dir, LEGACY_CHECKPOINT)
    return folder if os.path.isdir(folder) and not os.path.islink(folder) else None


def latest_checkpoint(run_dir: str) -> str | None:
    """The folder of the run's newest complete checkpoint, None before the first save (a
    run folder of minilars before versioned checkpoints has its one checkpoint/ folder)."""
    folders = _step_folders(run_dir)
    if folders:
        return folders[max(folders)]
    return _legacy(run_dir)


def save_checkpoint_folder(run_dir: str, step: int, write_files) -> str:
    """Write a checkpoint with write_files(folder) into a temporary folder, rename it to
    checkpoints/step-N, then delete older checkpoints and the leftovers of interrupted
    saves. Returns the new folder."""
    target = os.path.join(run_dir, CHECKPOINTS, f"step-{step:06d}")
    with atomic_dir(target) as tmp:
        write_files(tmp)
    clean_leftovers(run_dir, keep=target)
    return target


def clean_leftovers(run_dir: str, keep: str | None) -> list[str]:
    """Delete every checkpoint folder but `keep` and what interrupted writes left: the
    temporaries in checkpoints/ and those of our own files in the run folder (.run.json.*,
    the .checkpoint.* swaps of minilars before versioned checkpoints), and the old checkpoint/ folder once
    a newer checkpoint exists. Returns what was deleted."""
    root = os.path.join(run_dir, CHECKPOINTS)
    doomed = [os.path.join(root, n) for n in (os.listdir(root) if os.path.isdir(root) else [])]
    doomed += [os.path.join(run_dir, n) for n in os.listdir(run_dir)
               if n.startswith(_OUR_TEMPORARIES)]
    legacy = _legacy(run_dir)
    if keep is not None and legacy is not None and legacy != keep:
        doomed.append(legacy)
    removed = []
    for path in doomed:
        if keep is not None and os.path.abspath(path) == os.path.abspath(keep):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        removed.append(path)
    return removed


# ----------------------------------------------------------------------------- the log

def append_log(run_dir: str, record: dict) -> None:
    """Append one line to log.jsonl, whole or not at all: a failed write (a full disk)
    is cut back off before the error goes up, naming the file."""
    path = os.path.join(run_dir, LOG)
    line = (json.dumps(record) + "\n").encode("utf-8")
    with open(path, "ab") as f:
        end = f.seek(0, os.SEEK_END)
        try:
            f.write(line)
            f.flush()
        except OSError as e:
            with contextlib.suppress(OSError):
                f.truncate(end)
            raise OSError(e.errno, e.strerror, path) from None


def truncate_log(run_dir: str, step: int) -> int:
    """Keep the log's lines up to `step` (the checkpoint a resume starts from), so the
    steps redone are not logged twice. Lines that are not whole JSON records (the torn
    last line of a full disk or a kill) are dropped too. Returns how many were dropped."""
    path = os.path.join(run_dir, LOG)
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().split(b"\n")
    except FileNotFoundError:
        return 0
    kept, dropped = [], 0
    for raw in raw_lines:
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
            keep = isinstance(record, dict) and int(record["step"]) <= step
        except (ValueError, KeyError, TypeError, RecursionError):   # torn, not UTF-8, not a step line
            keep = False
        if keep:
            kept.append(raw.decode("utf-8") + "\n")
        else:
            dropped += 1
    if dropped:
        write_text(path, "".join(kept))
    return dropped
