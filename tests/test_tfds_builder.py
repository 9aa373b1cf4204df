"""The `text_files` tfds builder: array_record out, exactly the same documents back, no TensorFlow."""
import importlib.util
import json

import pytest
import tensorflow_datasets as tfds

from data_fixtures import small_tokenizer  # noqa: F401  (session fixture)
from llamax.data.loader import make_loader
from llamax.data.sources import TfdsDocuments, open_documents
from llamax.data.text_files import build_text_dataset
from llamax.errors import DataError

TEXTS = ["To be, or not to be", "héllo wörld 😀", "line one\nline two", "last"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tfds.disable_progress_bar()
    root = tmp_path_factory.mktemp("tfds")
    (root / "a.txt").write_text("\n\n".join(TEXTS[:3]) + "\n", encoding="utf-8")
    (root / "b.jsonl").write_text(json.dumps({"text": TEXTS[3]}) + "\n" + '{"text": ""}\n')
    (root / "sft.jsonl").write_text(json.dumps({"prompt": "Who?", "response": "Hamlet."}) + "\n")
    data_dir = root / "data"
    build_text_dataset("plays", [root / "a.txt", root / "b.jsonl"], data_dir,
                       validation_files=[root / "b.jsonl"], split="paragraph")
    build_text_dataset("chat", [root / "sft.jsonl"], data_dir, sft=True)
    return data_dir


def test_tensorflow_is_not_needed():
    assert importlib.util.find_spec("tensorflow") is None


def test_round_trip_via_tfds_data_source(prepared):
    source = tfds.data_source("text_files/plays", split="train", data_dir=str(prepared))
    assert [source[i]["text"].decode("utf-8") for i in range(len(source))] == TEXTS
    validation = tfds.data_source("text_files/plays", split="validation", data_dir=str(prepared))
    assert len(validation) == 1 and validation[0]["text"].decode() == "last"
    builder = tfds.builder("text_files/plays", data_dir=str(prepared))
    assert builder.info.file_format.value == "array_record"
    assert list((prepared / "text_files" / "plays" / "1.0.0").glob("*.array_record*"))


def test_open_documents_by_name(prepared, small_tokenizer):
    docs = open_documents("text_files/plays", "train", data_dir=prepared)
    assert isinstance(docs, TfdsDocuments) and list(docs) == TEXTS
    batch = next(make_loader(docs, small_tokenizer, seq_len=32, global_batch_size=2, shuffle=False))
    assert batch["tokens"][0, 0] == small_tokenizer.bos_id


def test_sft_dataset_round_trip(prepared):
    docs = open_documents("text_files/chat", "train", data_dir=prepared, sft_format=True)
    assert docs[0] == {"messages": [{"role": "user", "content": "Who?"},
                                    {"role": "assistant", "content": "Hamlet."}]}


def test_unknown_dataset_or_split(prepared):
    with pytest.raises(DataError, match="neither an existing local file"):
        open_documents("no_such_dataset_xyz", "train", data_dir=prepared)
    with pytest.raises(DataError, match="no split 'test'"):
        open_documents("text_files/plays", "test", data_dir=prepared)


def test_tfrecord_dataset_gives_a_clear_error(prepared, tmp_path):
    # Pretend the dataset was prepared as tfrecord (the default of `tfds build`).
    import shutil
    copy = tmp_path / "data"
    shutil.copytree(prepared / "text_files" / "plays", copy / "text_files" / "plays")
    info_path = copy / "text_files" / "plays" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"stored as tfrecord.*needs TensorFlow.*convert_format"):
        open_documents("text_files/plays", "train", data_dir=copy)


def test_empty_input_fails_preparation(tmp_path):
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="no non-empty documents"):
        build_text_dataset("empty", [tmp_path / "e.jsonl"], tmp_path / "data")


def test_command_line(tmp_path, capsys):
    from llamax.data.text_files.__main__ import main
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    main(["--name", "cli", "--train", str(tmp_path / "a.txt"), "--split", "paragraph",
          "--data_dir", str(tmp_path / "data")])
    assert "'train': 2" in capsys.readouterr().out
    assert list(open_documents("text_files/cli", "train", data_dir=tmp_path / "data")) == ["one", "two"]
