"""Data rows read from a user's JSONL file (minilars.data.tasks read_jsonl / check_row,
and the training examples built from them): a row of the wrong type or shape, a file
that is not UTF-8 or not gzip, each refused with a DataError naming the file and the
1-based line."""
import gzip
import json

import pytest

from minilars.data import tasks
from minilars.data.tasks import DataError, load_task, read_jsonl
from minilars.examples import encode_rows
from minilars.io.tokenizer import Tokenizer
from tests.tiny_folder import make_tiny_folder

GOOD = [{"text": "a reckless spirit"}, {"prompt": "Question: yes or no?", "completion": " yes"},
        {"query": "Q?", "choices": ["yes", "no"], "gold": 1},
        {"contexts": ["I jumped", "I lay"], "continuation": "from the school", "gold": 0}]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_good_rows_read_and_encode(tmp_path):
    tok = Tokenizer.from_folder(make_tiny_folder(str(tmp_path / "m")))
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in GOOD])
    rows = read_jsonl(path)
    assert rows == GOOD
    examples = encode_rows(tok, rows, seq=16)
    assert len(examples) == 4 and all(1 < len(e.tokens) <= 16 for e in examples)


@pytest.mark.parametrize("line, message", [
    ("5", r"a row is a JSON int; expected an object"),
    ('["text"]', r"a row is a JSON list; expected an object"),
    ('"text"', r"a row is a JSON str; expected an object"),
    ('{"text": 5}', r"'text' is 5; expected a Unicode string"),
    ('{"text": null}', r"'text' is None; expected a Unicode string"),
    ('{"text": "\\ud800"}', r"'text' is '\\ud800'; expected a Unicode string"),
    ('{"prompt": "p", "completion": ["c"]}', r"'completion' is \['c'\]; expected a Unicode string"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', r"'gold' is 2; expected an integer from 0 to 1"),
    ('{"query": "q", "choices": ["a", "b"], "gold": -1}', r"'gold' is -1; expected an integer from 0 to 1"),
    ('{"query": "q", "choices": ["a", "b"], "gold": "1"}', r"'gold' is '1'; expected an integer"),
    ('{"query": "q", "choices": ["a", "b"], "gold": true}', r"'gold' is True; expected an integer"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 1.0}', r"'gold' is 1.0; expected an integer"),
    ('{"query": "q", "choices": ["a", 3], "gold": 0}', r"'choices' is \['a', 3\]; expected a non-empty list of strings"),
    ('{"query": "q", "choices": "ab", "gold": 0}', r"'choices' is 'ab'; expected a non-empty list"),
    ('{"query": "q", "choices": [], "gold": 0}', r"'choices' is \[\]; expected a non-empty list"),
    ('{"query": 1, "choices": ["a"], "gold": 0}', r"'query' is 1; expected a Unicode string"),
    ('{"contexts": ["a"], "continuation": "c", "gold": 1}', r"'gold' is 1; expected an integer from 0 to 0"),
    ('{"contexts": "a", "continuation": "c", "gold": 0}', r"'contexts' is 'a'; expected a non-empty list"),
    ('{"question": "q"}', r"a row with keys \['question'\]; expected text, prompt/completion, query/choices/gold"),
    ('{"a": 1, "a": 2}', r"key 'a' appears twice"),
    ('{"text": NaN}', r"not valid JSON"),
    ("{nope", r"not valid JSON"),
])
def test_a_bad_row_names_the_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD[0]), "", line, json.dumps(GOOD[1])])
    with pytest.raises(DataError, match=rf"d.jsonl:3: {message}"):
        read_jsonl(path)


def test_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8 text \(invalid continuation byte at byte 13\)"):
        read_jsonl(str(path))


def test_a_gz_file_that_is_not_gzip_or_is_cut_off(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(b'{"text": "not compressed"}\n')
    with pytest.raises(DataError, match=r"d.jsonl.gz: cannot read line 1 \(BadGzipFile.*expected "
                                        r"gzip-compressed JSON lines"):
        read_jsonl(str(path))
    whole = gzip.compress(("".join(json.dumps(GOOD[0]) + "\n" for _ in range(200))).encode())
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match=r"d.jsonl.gz: cannot read line \d+ \(EOFError"):
        read_jsonl(str(path))
    path.write_bytes(whole)
    assert len(read_jsonl(str(path))) == 200


def test_missing_empty_and_folder(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: no such data file"):
        read_jsonl(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"e.jsonl: no examples"):
        read_jsonl(write_lines(tmp_path / "e.jsonl", ["", "  "]))
    with pytest.raises(DataError, match=rf"{tmp_path}: cannot read line 1"):
        read_jsonl(str(tmp_path))


def test_a_task_file_holds_multiple_choice_rows_only(tmp_path):
    folder = tmp_path / "boolq"
    folder.mkdir()
    rows = [GOOD[2], {"text": "not a question"}]
    (folder / "validation.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps(r) + "\n" for r in rows).encode()))
    with pytest.raises(DataError, match=r"validation.jsonl.gz:2: a row with keys \['text'\]; "
                                        r"expected query/choices/gold or contexts/continuation/gold"):
        load_task("boolq", "validation", tmp_path)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_a_gzip_bomb_is_refused_at_its_line_cap(tmp_path, monkeypatch):
    """A .gz of zeros is one endless line: refused once it passes the cap, not read whole."""
    monkeypatch.setattr(tasks, "MAX_LINE_BYTES", 1 << 20)
    path = tmp_path / "bomb.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"0" * (8 << 20))
    with pytest.raises(DataError, match=r"bomb.jsonl.gz:1: the line is longer than 1 MiB"):
        read_jsonl(str(path))
