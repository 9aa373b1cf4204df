"""Reading text / JSONL: bad input gives errors naming file, line and byte; nothing silent."""
import json
import logging

import pytest

from llamax.data.documents import read_documents, read_text_file
from llamax.data.sources import open_documents
from llamax.errors import DataError


def write(path, data):
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def test_text_splits(tmp_path):
    path = write(tmp_path / "a.txt", "one\ntwo\n\n\nthree\n")
    assert read_text_file(path, "file") == ["one\ntwo\n\n\nthree\n"]
    assert read_text_file(path, "paragraph") == ["one\ntwo", "three"]
    assert read_text_file(path, "line") == ["one", "two", "three"]


def test_jsonl_and_text_in_order(tmp_path):
    a = write(tmp_path / "a.jsonl", '{"text": "x"}\n\n{"text": "y", "id": 3}\n')
    b = write(tmp_path / "b.txt", "z\n")
    assert read_documents([a, b]) == ["x", "y", "z\n"]
    assert open_documents(tmp_path, text_split="line") == ["x", "y", "z"]
    assert open_documents(str(tmp_path / "*.jsonl")) == ["x", "y"]


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"empty\.txt is empty"):
        read_documents([write(tmp_path / "ok.txt", "x"), write(tmp_path / "empty.txt", "  \n")])


def test_empty_documents_are_skipped_with_a_warning(tmp_path, caplog):
    path = write(tmp_path / "a.jsonl", '{"text": ""}\n{"text": "kept"}\n{"text": "  "}\n')
    with caplog.at_level(logging.WARNING):
        assert read_documents([path]) == ["kept"]
    assert "skipped 2 empty document(s)" in caplog.text


def test_all_documents_empty_is_an_error(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": ""}\n{"text": " "}\n')
    with pytest.raises(DataError, match="no non-empty documents"):
        read_documents([path])


def test_non_utf8_names_file_line_and_offset(tmp_path):
    path = write(tmp_path / "latin1.txt", "first line\nsecond caf".encode() + b"\xe9\n")
    with pytest.raises(DataError, match=r"latin1\.txt:2: byte offset 21 .*not valid UTF-8"):
        read_documents([path])


def test_non_utf8_replace_flag_warns(tmp_path, caplog):
    path = write(tmp_path / "latin1.txt", b"caf\xe9 \xff ok \xef\xbf\xbd\n")
    with caplog.at_level(logging.WARNING):
        docs = read_documents([path], encoding_errors="replace")
    assert docs == ["caf\ufffd \ufffd ok \ufffd\n"]
    assert "replaced 2 invalid UTF-8" in caplog.text


def test_malformed_jsonl_raises_with_line_number(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "a"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: Expecting value.*on_error='skip'"):
        read_documents([path])


@pytest.mark.parametrize("line, match", [('"just a string"', "JSON object"),
                                         ('{"body": "x"}', "no 'text' field"),
                                         ('{"text": 5}', "must be a string")])
def test_jsonl_record_errors(tmp_path, line, match):
    path = write(tmp_path / "bad.jsonl", '{"text": "a"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: .*" + match):
        read_documents([path])


def test_malformed_jsonl_skip_counts(tmp_path, caplog):
    path = write(tmp_path / "bad.jsonl", '{"text": "a"}\nnope\n{"text": 1}\n{"text": "b"}\n')
    with caplog.at_level(logging.WARNING):
        assert read_documents([path], on_error="skip") == ["a", "b"]
    assert "skipped 2 malformed line(s)" in caplog.text
    with pytest.raises(DataError, match="on_error must be"):
        read_documents([path], on_error="ignore")


def test_text_key(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"content": "a"}\n')
    assert read_documents([path], text_key="content") == ["a"]


def test_missing_input(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_documents([tmp_path / "nope.txt"])
    with pytest.raises(DataError, match="no input files"):
        read_documents([])


def test_sft_records_read_as_text_point_at_the_template_not_at_skipping(tmp_path):
    """Skipping every line of an SFT file would leave nothing to evaluate: the message must name
    the fix (an SFT template), not on_error='skip' (which experiments.eval does not even have)."""
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": "Who art thou?", "response": "A friend."}) + "\n")
    with pytest.raises(DataError, match=r"chat\.jsonl:1: this is an SFT record.*sft_template") as caught:
        read_documents([path])
    assert "skip" not in str(caught.value)
