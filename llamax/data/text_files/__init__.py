"""tfds builder `text_files`: local text / JSONL files -> array_record dataset."""
from llamax.data.text_files.text_files_dataset_builder import (
    TextFiles,
    TextFilesConfig,
    build_text_dataset,
)

__all__ = ["TextFiles", "TextFilesConfig", "build_text_dataset"]
