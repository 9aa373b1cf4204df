"""Helpers the task YAMLs in this folder name with `!function shakespeare.<name>`.

Data files are found relative to this file, so `--include_path configs/lm_eval` works from any
working directory and nothing is downloaded (`datasets` is only used to hold the rows).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def load_jsonl(splits: dict[str, str], **_metadata) -> "datasets.DatasetDict":  # noqa: F821
    """{split: file in data/} -> a DatasetDict. lm-eval passes its --metadata (and the model
    args) as keyword arguments too; they are not needed here."""
    import datasets

    loaded = {}
    for split, name in splits.items():
        path = DATA_DIR / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; rebuild the task data with "
                                    "`python -m experiments.lm_eval_tasks`")
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not a JSON object ({error})") from None
        if not rows:
            raise ValueError(f"{path} holds no documents (empty task file); rebuild it with "
                             "`python -m experiments.lm_eval_tasks`")
        loaded[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(loaded)


def perplexity_results(doc: dict, results: list) -> dict:
    """Per-document (loglikelihood, words) and (loglikelihood, bytes), as lm-eval's wikitext."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    num_bytes = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, num_bytes),
            "bits_per_byte": (loglikelihood, num_bytes)}
