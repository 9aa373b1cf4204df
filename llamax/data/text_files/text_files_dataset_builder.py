"""A tfds builder that turns local text / JSONL files into an `array_record` dataset.

Each example is `{"text": str}`: the document text for pretraining data, or, for SFT data, the
validated conversation serialised as JSON (`{"messages": [...]}`). Examples keep the order of the
input files (`disable_shuffling`), so a prepared dataset reads back exactly what was put in.
Reading back needs no TensorFlow:

    builder = TextFiles(config=TextFilesConfig(name="mine", train_files=("a.txt",)),
                        data_dir=DIR, file_format="array_record")
    builder.download_and_prepare()
    source = tfds.data_source("text_files/mine", split="train", data_dir=DIR)  # or:
    source = builder.as_data_source(split="train")
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import tensorflow_datasets as tfds

from llamax.data import documents as documents_lib
from llamax.errors import DataError


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    """Which files make up each split and how they are read (see `llamax.data.documents`).

    Attributes:
        train_files: files of the 'train' split (required).
        validation_files: files of the 'validation' split (optional).
        sft: records are SFT conversations (prompt/response or messages JSONL).
        text_key: field holding the text in pretraining JSONL.
        split: how plain-text files become documents: 'file', 'paragraph' or 'line'.
        on_error: 'raise' or 'skip' malformed JSONL lines.
        encoding_errors: 'strict' or 'replace' non-UTF-8 bytes.
    """

    train_files: tuple[str, ...] = ()
    validation_files: tuple[str, ...] = ()
    sft: bool = False
    text_key: str = "text"
    split: str = "file"
    on_error: str = "raise"
    encoding_errors: str = "strict"


class TextFiles(tfds.core.GeneratorBasedBuilder):
    """Local text / JSONL files as a tfds dataset (one feature: `text`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIG_CLASS = TextFilesConfig

    def __init__(self, *, config: TextFilesConfig | str | None = None, **kwargs):
        if isinstance(config, TextFilesConfig):
            config = dataclasses.replace(
                config, version=config.version or self.VERSION,
                train_files=tuple(str(Path(f).resolve()) for f in config.train_files),
                validation_files=tuple(str(Path(f).resolve()) for f in config.validation_files))
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Documents read from local text or JSONL files by llamax.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        config = self.builder_config
        if not config.train_files:
            raise DataError(
                "TextFilesConfig.train_files is empty; give the files of the 'train' split")
        splits = {"train": self._generate_examples(config.train_files)}
        if config.validation_files:
            splits["validation"] = self._generate_examples(config.validation_files)
        return splits

    def _generate_examples(self, files):
        config = self.builder_config
        docs = documents_lib.read_documents(
            list(files), sft_format=config.sft, text_key=config.text_key, split=config.split,
            on_error=config.on_error, encoding_errors=config.encoding_errors)
        width = len(str(len(docs)))
        for index, doc in enumerate(docs):
            text = json.dumps(doc, ensure_ascii=False) if config.sft else doc
            # Keys are zero-padded so that key order is input order.
            yield f"{index:0{width}d}", {"text": text}


def build_text_dataset(name: str, train_files, data_dir: str | os.PathLike, *,
                       validation_files=(), **config_kwargs) -> TextFiles:
    """Prepares `text_files/{name}` under `data_dir` as array_record and returns the builder.

    `config_kwargs` are further `TextFilesConfig` fields (sft, text_key, split, on_error, ...).
    Preparing again with the same name and data_dir reuses the existing files.
    """
    config = TextFilesConfig(name=name, train_files=tuple(map(str, train_files)),
                             validation_files=tuple(map(str, validation_files)), **config_kwargs)
    builder = TextFiles(config=config, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder
