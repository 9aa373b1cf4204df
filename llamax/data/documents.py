"""Reading local text and JSONL files into documents, with errors that name file and line.

A document is either a `str` (pretraining text) or, for SFT, `{"messages": [...]}` (see
`llamax.data.sft`). Rules, the same for every reader:
  * a file that is empty (or only whitespace) is an error: remove it from the input list;
  * empty documents (blank paragraphs, `{"text": ""}`) are skipped and counted in a warning;
    if no document is left at all, that is an error;
  * bytes that are not UTF-8 raise an error naming the file, line and byte offset, unless
    `encoding_errors='replace'`, which substitutes U+FFFD and logs how many were replaced;
  * a malformed JSONL line raises with file and line number, unless `on_error='skip'`, which
    skips it and logs a warning with the count.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from llamax.data import sft
from llamax.errors import DataError

log = logging.getLogger(__name__)

TextSplit = Literal["file", "paragraph", "line"]
OnError = Literal["raise", "skip"]
EncodingErrors = Literal["strict", "replace"]
Document = Any  # str | {"messages": [...]}


def read_utf8(path: Path, encoding_errors: EncodingErrors = "strict") -> str:
    """Decodes a whole file as UTF-8, reporting the first bad byte's line and offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if encoding_errors != "replace":
            line = data.count(b"\n", 0, e.start) + 1
            raise DataError(
                f"{path}:{line}: byte offset {e.start} ({data[e.start:e.start + 1]!r}) is not valid "
                f"UTF-8 ({e.reason}). Re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) "
                "or pass encoding_errors='replace' to substitute U+FFFD") from e
    text = data.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - data.count("\ufffd".encode())
    log.warning("%s: replaced %d invalid UTF-8 byte sequence(s) with U+FFFD", path, replaced)
    return text


def read_text_file(path: str | os.PathLike, split: TextSplit = "file",
                   encoding_errors: EncodingErrors = "strict") -> list[str]:
    """Documents of a plain-text file: the whole file, each blank-line separated paragraph, or
    each line. Empty documents are dropped."""
    path = Path(path)
    text = _check_nonempty(path, read_utf8(path, encoding_errors)).replace("\r\n", "\n")
    if split == "file":
        docs = [text]
    elif split == "paragraph":
        docs = [p.strip("\n") for p in re.split(r"\n\s*\n", text)]
    elif split == "line":
        docs = text.split("\n")
    else:
        raise DataError(f"split must be 'file', 'paragraph' or 'line', got {split!r}")
    return [d for d in docs if d.strip()]


def read_jsonl(path: str | os.PathLike, parse: Callable[[Any], Document | None],
               on_error: OnError = "raise",
               encoding_errors: EncodingErrors = "strict") -> list[Document]:
    """Parses each non-blank line as JSON and passes it to `parse`.

    `parse` returns a document, None for an empty one (skipped), or raises ValueError describing
    what is wrong with the record; the error is re-raised with file and line number.
    """
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    text = _check_nonempty(path, read_utf8(path, encoding_errors))
    docs, bad, empty = [], 0, 0
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            doc = parse(json.loads(line))
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; RecursionError:
            # arrays nested thousands deep exhaust the decoder's stack
            if isinstance(e, WrongRecordKind):  # the whole file is of another kind: skipping won't do
                raise DataError(f"{path}:{number}: {e}") from e
            if on_error == "raise":
                raise DataError(f"{path}:{number}: {e}. Fix the line, or skip malformed records "
                                "with on_error='skip' (DataConfig.on_error; they are counted in a "
                                "warning)") from e
            bad += 1
            continue
        if doc is None:
            empty += 1
        else:
            docs.append(doc)
    if empty:
        log.warning("%s: skipped %d empty document(s)", path, empty)
    if bad:
        log.warning("%s: skipped %d malformed line(s) (on_error='skip')", path, bad)
    return docs


class WrongRecordKind(ValueError):
    """A JSONL record of another kind than the reader expects (SFT records read as text)."""


def text_record_parser(text_key: str = "text") -> Callable[[Any], str | None]:
    """Parser for pretraining JSONL: `{text_key: "..."}` -> the text (None if blank)."""
    def parse(record: Any) -> str | None:
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        if text_key not in record and ("messages" in record or {"prompt", "response"} <= set(record)):
            raise WrongRecordKind(
                f"this is an SFT record (fields {sorted(record)[:8]}), read as plain text: set an SFT "
                "template (DataConfig.sft_template; --sft_template for experiments.eval) so the "
                "conversation is rendered and only responses are scored")
        if text_key not in record:
            raise ValueError(f"record has no {text_key!r} field (fields: {sorted(record)[:8]})")
        text = record[text_key]
        if not isinstance(text, str):
            raise ValueError(f"field {text_key!r} must be a string, got {type(text).__name__}")
        return text if text.strip() else None
    return parse


def sft_record_parser(record: Any) -> dict | None:
    """Parser for SFT JSONL: prompt/response or messages -> `{"messages": [...]}`."""
    return {"messages": sft.parse_record(record)}


def record_parser(sft_format: bool = False, preference_format: bool = False,
                  text_key: str = "text") -> Callable[[Any], Document | None]:
    """The parser of one record (a JSONL line, a Parquet/Arrow row) of the given kind."""
    if preference_format:
        from llamax.data.preference import parse_preference_record

        return parse_preference_record
    return sft_record_parser if sft_format else text_record_parser(text_key)


def read_documents(paths: Sequence[str | os.PathLike], *, sft_format: bool = False,
                   text_key: str = "text", split: TextSplit = "file", on_error: OnError = "raise",
                   encoding_errors: EncodingErrors = "strict",
                   preference_format: bool = False) -> list[Document]:
    """Documents of many files, in order. `.jsonl`/`.json` files are JSONL, the rest plain text.

    Args:
        paths: input files.
        sft_format: records are SFT (`prompt`/`response` or `messages`); JSONL only.
        preference_format: records are preference pairs (`llamax.data.preference`); JSONL only.
        text_key: field holding the text in pretraining JSONL.
        split: how plain-text files are cut into documents ('file', 'paragraph', 'line').
        on_error: 'raise' or 'skip' malformed JSONL lines.
        encoding_errors: 'strict' (raise on non-UTF-8 bytes) or 'replace'.
    """
    if not paths:
        raise DataError("no input files given")
    parse = record_parser(sft_format, preference_format, text_key)
    records = "preference" if preference_format else "SFT" if sft_format else None
    docs, before = [], 0
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"input file {str(path)!r} does not exist")
        if path.suffix in (".jsonl", ".json"):
            docs.extend(read_jsonl(path, parse, on_error, encoding_errors))
        elif records:
            raise DataError(f"{path}: {records} data must be JSONL (.jsonl), Parquet or Arrow "
                            "records, not plain text")
        else:
            docs.extend(read_text_file(path, split, encoding_errors))
        if len(docs) == before:
            log.warning("%s: no non-empty documents", path)
        before = len(docs)
    if not docs:
        raise DataError(f"no non-empty documents in {[str(p) for p in paths]}; every document "
                        "was blank or skipped")
    return docs


def _check_nonempty(path: Path, text: str) -> str:
    if not text.strip():
        raise DataError(f"{path} is empty (or only whitespace); remove it from the input files")
    return text
