"""One entry point for where documents come from: local files, Parquet / Hugging Face datasets on
disk, or a prepared tfds dataset.

`open_documents` returns a random-access sequence of documents (`str`, `{"messages": ...}` for
SFT, parsed preference records for DPO) that the grain loader shuffles and shards by index:
  * Parquet files and `save_to_disk` datasets (a file, folder or glob): read lazily, row group
    by row group, by `llamax.data.tables`;
  * local text / JSONL files (paths, a directory, or a glob): read into memory by
    `llamax.data.documents`;
  * a tfds name (`"text_files/mine"`, `"c4/en:3.1.0"`, ...) with `data_dir`: read lazily with
    `tfds.data_source`, which needs the dataset prepared as `array_record`. Datasets prepared as
    `tfrecord` need TensorFlow; convert them once with
    `tfds convert_format --root_data_dir DIR --out_file_format array_record`.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Sequence

from llamax.data import documents as documents_lib
from llamax.data import sft
from llamax.data.tables import open_table
from llamax.errors import DataError


class TfdsDocuments:
    """Lazy view of a tfds data source: record -> str (or SFT messages)."""

    def __init__(self, data_source, name: str, sft_format: bool, text_key: str = "text"):
        self._source = data_source
        self.name = name
        self.sft_format = sft_format
        self.text_key = text_key

    def __len__(self) -> int:
        return len(self._source)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"document {index} out of range for {len(self)} documents")
        record = self._source[index % len(self)]
        if self.text_key not in record:
            raise DataError(f"tfds dataset {self.name!r} has no feature {self.text_key!r} "
                            f"(features: {sorted(record)}); pass text_key=")
        value = record[self.text_key]
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        if not self.sft_format:
            return text
        try:
            return {"messages": sft.parse_record(json.loads(text))}
        except ValueError as e:
            raise DataError(f"tfds dataset {self.name!r} record {index}: {e}") from e


def local_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path] | None:
    """The files `source` names (paths, a directory's files, a glob), or None if it names none."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            return sorted(p for p in path.iterdir() if p.is_file())
        if path.is_file():
            return [path]
        matches = sorted(glob.glob(str(source)))
        return [Path(m) for m in matches] if matches else None
    return [Path(p) for p in source]


def open_documents(source: str | os.PathLike | Sequence[str | os.PathLike], split: str = "train",
                   *, data_dir: str | os.PathLike | None = None, sft_format: bool = False,
                   text_key: str = "text", text_split: documents_lib.TextSplit = "file",
                   on_error: documents_lib.OnError = "raise",
                   encoding_errors: documents_lib.EncodingErrors = "strict",
                   preference_format: bool = False) -> Sequence[Any]:
    """Documents of Parquet/Arrow data, local files or split `split` of a prepared tfds dataset.

    Args:
        source: Parquet/Arrow data, file paths, a directory, a glob, or a tfds dataset name.
        split: tfds split, or the split of a saved DatasetDict / a folder of split-named shards
            (ignored for text and JSONL files).
        data_dir: tfds data directory (default: tfds' own, `~/tensorflow_datasets`).
        sft_format: documents are SFT conversations.
        preference_format: documents are preference pairs (`llamax.data.preference`).
        text_key: JSONL field / Parquet column / tfds feature holding the text.
        text_split: how local plain-text files are cut ('file', 'paragraph', 'line').
        on_error, encoding_errors: see `llamax.data.documents`.
    """
    kind = "preference" if preference_format else "sft" if sft_format else "text"
    table = open_table(source, split, text_key=text_key, record_kind=kind,
                       parse=None if kind == "text" else documents_lib.record_parser(
                           sft_format, preference_format, text_key))
    if table is not None:
        return table
    files = local_files(source)
    if files is not None:
        return documents_lib.read_documents(
            files, sft_format=sft_format, text_key=text_key, split=text_split, on_error=on_error,
            encoding_errors=encoding_errors, preference_format=preference_format)
    if preference_format:
        raise DataError(f"preference data {str(source)!r} is neither a JSONL file nor Parquet/Arrow "
                        "data (a path, folder or glob that exists)")
    return open_tfds(str(source), split, data_dir=data_dir, sft_format=sft_format,
                     text_key=text_key)


def open_tfds(name: str, split: str, *, data_dir=None, sft_format: bool = False,
              text_key: str = "text") -> TfdsDocuments:
    """Split `split` of the prepared tfds dataset `name` as lazy documents."""
    import tensorflow_datasets as tfds

    import llamax.data.text_files  # noqa: F401  (registers the `text_files` builder)

    try:
        builder = tfds.builder(
            name, data_dir=None if data_dir is None else os.path.expanduser(str(data_dir)))
    except Exception as e:  # tfds raises DatasetNotFoundError / ValueError / TypeError
        raise DataError(
            f"{name!r} is neither an existing local file/directory/glob nor a tfds dataset found "
            f"under data_dir={str(data_dir)!r} ({type(e).__name__}: {str(e)[:300]})") from e
    if not builder.is_prepared():
        raise DataError(
            f"tfds dataset {name!r} is not prepared under {builder.data_dir}; prepare it with "
            "file_format='array_record' (e.g. `tfds build NAME --file_format=array_record`, or "
            "`python -m llamax.data.text_files` for local files)")
    file_format = builder.info.file_format
    if file_format is not None and file_format.value != "array_record":
        has_tf = importlib.util.find_spec("tensorflow") is not None
        raise DataError(
            f"tfds dataset {name!r} under {builder.data_dir} is stored as {file_format.value}, which "
            "has no random access" + ("" if has_tf else " and needs TensorFlow (not installed)")
            + "; the grain loader needs array_record. Convert it once with `tfds convert_format "
            f"--dataset_dir {builder.data_dir} --out_file_format array_record`")
    if split not in builder.info.splits:
        raise DataError(f"tfds dataset {name!r} has no split {split!r}; it has "
                        f"{sorted(builder.info.splits)}")
    return TfdsDocuments(builder.as_data_source(split=split), name, sft_format, text_key)
