"""Parquet files and Hugging Face `save_to_disk` datasets (llamax.data.tables) give the same token
stream as the same rows in JSONL: pretraining text, SFT records and preference pairs; shuffled
(block shuffle), per process, and resumed; a missing text column is one clear error."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from data_fixtures import small_tokenizer  # noqa: F401 (fixture)
from llamax.data.corpus import shakespeare_passages
from llamax.data.loader import LoaderConfig, make_loader
from llamax.data.pipeline import DataConfig, train_loader
from llamax.data.shakespeare_sft import shakespeare_dpo_records, shakespeare_sft_records
from llamax.data.sources import open_documents
from llamax.data.tables import table_files
from llamax.errors import DataError

ROWS = 240


def text_rows():
    return [{"text": text, "id": i} for i, text in enumerate(shakespeare_passages("validation")[:ROWS])]


def write_all(rows, folder):
    """The same rows as JSONL, Parquet (several row groups, two files), a saved Dataset (three
    Arrow shards) and a saved DatasetDict; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = folder / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    parquet = folder / "parquet"
    parquet.mkdir()
    half = len(rows) // 2
    for name, part in (("part-0.parquet", rows[:half]), ("part-1.parquet", rows[half:])):
        pq.write_table(pa.Table.from_pylist(part), parquet / name, row_group_size=37)
    Dataset.from_list(rows).save_to_disk(str(folder / "saved"), num_shards=3)
    DatasetDict({"train": Dataset.from_list(rows), "validation": Dataset.from_list(rows[:5])}).save_to_disk(
        str(folder / "saved_dict"))
    return {"jsonl": str(jsonl), "parquet": str(parquet), "parquet_glob": str(parquet / "*.parquet"),
            "saved": str(folder / "saved"), "saved_dict": str(folder / "saved_dict")}


def batches(documents, tokenizer, count, **config):
    loader = make_loader(documents, tokenizer, LoaderConfig(**{
        "seq_len": 64, "global_batch_size": 4, "seed": 3, "shuffle_window": 16, **config}))
    return [next(loader) for _ in range(count)], loader


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("kind", ["text", "sft", "preference"])
def test_parquet_and_saved_datasets_give_the_jsonl_token_stream(small_tokenizer, tmp_path, kind):  # noqa: F811
    rows = {"text": text_rows(), "sft": shakespeare_sft_records("validation")[:ROWS],
            "preference": [{k: v for k, v in r.items() if k != "reference"}
                           for r in shakespeare_dpo_records("validation")[:ROWS]]}[kind]
    paths = write_all(rows, tmp_path)
    options = dict(sft_format=kind == "sft", preference_format=kind == "preference", text_split="file")
    config = dict(sft_template="plain" if kind == "sft" else None, preference=kind == "preference",
                  seq_len=128 if kind == "preference" else 64)
    reference, _ = batches(open_documents(paths["jsonl"], **options), small_tokenizer, 25, **config)
    for name in ("parquet", "parquet_glob", "saved", "saved_dict"):
        documents = open_documents(paths[name], "train", **options)
        assert len(documents) == len(rows), name
        assert_same_batches(batches(documents, small_tokenizer, 25, **config)[0], reference)
    # Unshuffled too (evaluation order), and each process's slice of a two-process run.
    for process in (0, 1):
        split = dict(config, shuffle=False, process_index=process, process_count=2)
        assert_same_batches(batches(open_documents(paths["saved"], **options), small_tokenizer, 8, **split)[0],
                            batches(open_documents(paths["jsonl"], **options), small_tokenizer, 8, **split)[0])


def test_table_loader_resumes_exactly_across_an_epoch(small_tokenizer, tmp_path):  # noqa: F811
    paths = write_all([{"text": row["text"][:300]} for row in text_rows()[:12]], tmp_path)
    documents = open_documents(paths["parquet"], text_split="file")
    run, loader = batches(documents, small_tokenizer, 40, fill_rows=True)
    assert loader.epoch >= 1
    _, cut = batches(documents, small_tokenizer, 13, fill_rows=True)
    state = json.loads(json.dumps(cut.get_state()))
    resumed = make_loader(open_documents(paths["parquet"], text_split="file"), small_tokenizer, LoaderConfig(
        seq_len=64, global_batch_size=4, seed=3, shuffle_window=16, fill_rows=True))
    resumed.set_state(state)
    assert_same_batches([next(resumed) for _ in range(27)], run[13:])


def test_text_column_is_configurable_and_a_missing_one_is_one_clear_error(small_tokenizer, tmp_path):  # noqa: F811
    rows = [{"body": row["text"]} for row in text_rows()[:20]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "body.parquet")
    with pytest.raises(DataError, match=r"no column 'text' .*columns: \['body'\].*text_key"):
        open_documents(tmp_path / "body.parquet")
    documents = open_documents(tmp_path / "body.parquet", text_key="body")
    assert documents[3] == rows[3]["body"]
    # Through the run's DataConfig: the default train_loader reads the column it is told to.
    loader = train_loader(DataConfig(tokenizer=str(small_tokenizer.path), train=str(tmp_path / "body.parquet"),
                                     text_key="body"), small_tokenizer, 64, 4, 0)
    assert next(loader)["tokens"].shape == (4, 64)


def test_a_saved_dataset_dict_reads_the_requested_split_and_names_the_others(tmp_path):
    paths = write_all(text_rows()[:30], tmp_path)
    assert len(open_documents(paths["saved_dict"], "validation")) == 5
    with pytest.raises(DataError, match=r"without split 'test'.*\['train', 'validation'\]"):
        open_documents(paths["saved_dict"], "test")
    # A hub-style folder of split-named shards: only that split's files.
    shards = tmp_path / "hub" / "data"
    shards.mkdir(parents=True)
    for split in ("train", "test"):
        pq.write_table(pa.Table.from_pylist(text_rows()[:7]), shards / f"{split}-00000-of-00001.parquet")
    assert [p.name for p in table_files(tmp_path / "hub", "test")] == ["test-00000-of-00001.parquet"]


def test_a_bad_preference_row_in_parquet_names_file_and_row(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "x", "chosen": "same", "rejected": "same"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "prefs.parquet")
    documents = open_documents(tmp_path / "prefs.parquet", preference_format=True)
    assert documents[0]["chosen"] == "b"
    with pytest.raises(DataError, match=r"prefs.parquet: row 1: 'chosen' and 'rejected' are identical"):
        documents[1]
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "chosen": "b"}]), tmp_path / "half.parquet")
    with pytest.raises(DataError, match="no column 'rejected'"):
        open_documents(tmp_path / "half.parquet", preference_format=True)
