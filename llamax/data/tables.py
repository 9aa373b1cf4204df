"""Parquet files and Hugging Face datasets on disk, read lazily: row groups, never whole files.

    open_table(source, split) -> TableDocuments | None  (None: `source` is not such data)

What counts as table data:
  * Parquet: a `.parquet` file, a glob of them, or a folder holding them (searched recursively,
    e.g. a hub snapshot's `data/train-00000-of-00004.parquet`);
  * Arrow: a folder written by `datasets.Dataset.save_to_disk` (`state.json` lists its
    `.arrow` shards), a `DatasetDict.save_to_disk` folder (`dataset_dict.json`: the split's
    subfolder is read), an `.arrow` file or a folder of them.
In a folder whose file names carry split names (`train-*.parquet`, `validation/...`) only the
requested split's files are read. Arrow files are memory-mapped (the operating system pages in
what is read); Parquet is decoded one row group at a time, a few row groups kept, so a
block-shuffled pass (`llamax.data.shuffle`) decodes each row group about once per epoch.

Rows become documents like JSONL lines: the text column (`text_key`, default 'text') for
pretraining, SFT records (prompt/response or messages columns) or preference records
(`llamax.data.preference`). A missing column is a DataError when the source is opened.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from llamax.errors import DataError

TABLE_SUFFIXES = (".parquet", ".arrow")
DEFAULT_SHUFFLE_WINDOW = 4096  # documents per shuffle block of a table source
_CACHED_ROW_GROUPS = 4


class _Blocks:
    """Random access to rows of many files, one block (row group, record batch) at a time."""

    def __init__(self, files: Sequence[Path], columns: list[str] | None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.files, self.columns = list(files), columns
        self._parquet: dict[int, Any] = {}
        self._batches: dict[int, list] = {}  # Arrow: memory-mapped record batches per file
        self.schema_names: list[str] = []
        blocks = []  # (file index, block index, rows)
        for index, path in enumerate(self.files):
            if path.suffix == ".parquet":
                parquet = pq.ParquetFile(str(path), memory_map=True)
                self._parquet[index] = parquet
                names = parquet.schema_arrow.names
                blocks += [(index, group, parquet.metadata.row_group(group).num_rows)
                           for group in range(parquet.num_row_groups)]
            else:
                mapped = pa.memory_map(str(path))
                try:
                    reader = pa.ipc.open_file(mapped)
                    batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
                except pa.ArrowInvalid:  # datasets writes the IPC stream format
                    mapped.seek(0)
                    reader = pa.ipc.open_stream(mapped)
                    batches = list(reader)
                names = reader.schema.names
                self._batches[index] = batches
                blocks += [(index, b, batch.num_rows) for b, batch in enumerate(batches)]
            if not self.schema_names:
                self.schema_names = names
            elif names != self.schema_names and columns is None:
                raise DataError(f"{path} has columns {names}, but {self.files[0]} has "
                                f"{self.schema_names}; every file of a source needs the same columns")
        self.blocks = [block for block in blocks if block[2] > 0]
        self.starts = np.cumsum([0] + [rows for _, _, rows in self.blocks])  # [blocks + 1]
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _block(self, block: int) -> dict[str, list]:
        with self._lock:
            if block in self._cache:
                self._cache.move_to_end(block)
                return self._cache[block]
            file, index, _ = self.blocks[block]
            if file in self._parquet:
                table = self._parquet[file].read_row_group(index, columns=self.columns)
            else:
                batch = self._batches[file][index]
                table = batch.select(self.columns) if self.columns else batch
            columns = {name: table.column(name) for name in table.schema.names}
            self._cache[block] = columns
            if len(self._cache) > _CACHED_ROW_GROUPS:
                self._cache.popitem(last=False)
            return columns

    def location(self, index: int) -> tuple[Path, int]:
        """(file, row within the file) of row `index`, for error messages."""
        block = int(np.searchsorted(self.starts, index, side="right")) - 1
        file, number, _ = self.blocks[block]
        before = sum(rows for f, n, rows in self.blocks if f == file and n < number)
        return self.files[file], before + index - int(self.starts[block])

    def row(self, index: int) -> dict[str, Any]:
        block = int(np.searchsorted(self.starts, index, side="right")) - 1
        columns = self._block(block)
        offset = index - int(self.starts[block])
        return {name: column[offset].as_py() for name, column in columns.items()}


class TableDocuments:
    """Documents of a table source: a lazy, random-access sequence (see the module docstring)."""

    def __init__(self, name: str, files: Sequence[Path], parse: Callable[[Any], Any] | None,
                 text_key: str, required: Sequence[str]):
        self.name = name
        self._rows = _Blocks(files, [text_key] if parse is None else None)
        names = self._rows.schema_names
        missing = [column for column in required if column not in names]
        if missing:
            hint = "; pass text_key= (DataConfig.text_key) naming the text column" if parse is None else ""
            raise DataError(f"{name}: no column {' or '.join(map(repr, missing))} in {self._rows.files[0]} "
                            f"(columns: {names[:12]}){hint}")
        self._parse, self._text_key = parse, text_key
        self.shuffle_window = DEFAULT_SHUFFLE_WINDOW  # read by the loader (`llamax.data.shuffle`)

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"document {index} out of range for {len(self)} documents")
        index %= len(self)
        row = self._rows.row(index)
        if self._parse is None:
            text = row[self._text_key]
            if text is not None and not isinstance(text, str):
                path, number = self._rows.location(index)
                raise DataError(f"{path}: row {number}: column {self._text_key!r} must hold strings, "
                                f"got {type(text).__name__}")
            return text or ""  # empty documents are skipped by the loader
        try:
            return self._parse(row)
        except ValueError as e:
            path, number = self._rows.location(index)
            raise DataError(f"{path}: row {number}: {e}") from e


# ---- finding the files ------------------------------------------------------------------------

def _split_files(files: list[Path], root: Path, split: str) -> list[Path]:
    """The files of `split` when names or folders say splits; else all files."""
    def names_split(path: Path, name: str) -> bool:
        parts = path.relative_to(root).parts
        return any(part == name or part.startswith(f"{name}-") or part.startswith(f"{name}.")
                   or part.startswith(f"{name}_") for part in parts)

    marked = [path for path in files if names_split(path, split)]
    return marked if marked else files


def _saved_dataset_files(folder: Path, split: str) -> list[Path] | None:
    """The Arrow files of a `save_to_disk` folder (for a DatasetDict: of `split`), or None."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise DataError(f"{folder} is a saved DatasetDict without split {split!r}; it has {splits} "
                            "(DataConfig.train_split / validation_split choose one)")
        folder = folder / split
    state = folder / "state.json"
    if not state.is_file():
        return None
    data_files = json.loads(state.read_text()).get("_data_files", [])
    files = [folder / entry["filename"] for entry in data_files]
    absent = [str(f) for f in files if not f.is_file()]
    if absent or not files:
        raise DataError(f"{folder}: state.json lists Arrow files that are not there: {absent[:3]}")
    return files


def table_files(source: str | os.PathLike, split: str = "train") -> list[Path] | None:
    """The Parquet/Arrow files `source` names (see the module docstring), or None."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source).expanduser()
    if path.is_file():
        return [path] if path.suffix in TABLE_SUFFIXES else None
    if path.is_dir():
        saved = _saved_dataset_files(path, split)
        if saved is not None:
            return saved
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TABLE_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            return None
        kinds = {p.suffix for p in found}
        if len(kinds) > 1:
            raise DataError(f"{path} holds both Parquet and Arrow files; point at one kind")
        return _split_files(found, path, split)
    matches = sorted(Path(m) for m in glob.glob(str(path)) if Path(m).is_file())
    if matches and all(m.suffix in TABLE_SUFFIXES for m in matches):
        return matches
    return None


def open_table(source: str | os.PathLike, split: str = "train", *,
               parse: Callable[[Any], Any] | None = None, text_key: str = "text",
               record_kind: str = "text") -> TableDocuments | None:
    """Documents of Parquet/Arrow data (None when `source` names none). `parse`: the record
    parser for SFT or preference rows (None: pretraining text from column `text_key`)."""
    files = table_files(source, split)
    if files is None:
        return None
    required = {"text": [text_key], "preference": ["chosen", "rejected"]}.get(record_kind, [])
    return TableDocuments(str(source), files, parse, text_key, required)
