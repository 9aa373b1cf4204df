"""The grain loader: batch contract, exact resume (also across epochs), epochs, process sharding."""
import json
from collections import Counter

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_fixtures import small_tokenizer  # noqa: F401  (session fixture)
from llamax.data import BATCH_DTYPES, BATCH_KEYS, corpus
from llamax.sharding import to_global_batch
from llamax.data.loader import make_loader
from llamax.errors import ConfigError, DataError

SEQ_LEN, BATCH = 64, 4


@pytest.fixture(scope="module")
def documents():
    """40 distinct short Shakespeare passages (120-350 characters, < 256 tokens each)."""
    passages = corpus.shakespeare_passages("validation", passage_chars=200)
    return list(dict.fromkeys(p for p in passages if 120 <= len(p) <= 350))[:40]


def segments(batches):
    """Token tuples of every segment, in order."""
    out = []
    for batch in batches:
        for tokens, seg in zip(batch["tokens"], batch["segment_ids"]):
            out += [tuple(tokens[seg == k]) for k in range(1, seg.max() + 1)]
    return out


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key])


def test_batch_contract(documents, small_tokenizer):
    batch = next(make_loader(documents, small_tokenizer, seq_len=SEQ_LEN, global_batch_size=BATCH))
    assert set(batch) == set(BATCH_KEYS)
    for key in BATCH_KEYS:
        assert batch[key].shape == (BATCH, SEQ_LEN) and batch[key].dtype == BATCH_DTYPES[key]
    seg, pos = batch["segment_ids"], batch["positions"]
    assert np.all(batch["tokens"][(pos == 0) & (seg > 0)][:1] == small_tokenizer.bos_id)
    same_next = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)
    np.testing.assert_array_equal(batch["targets"][:, :-1][same_next], batch["tokens"][:, 1:][same_next])
    assert np.all(batch["loss_mask"][:, :-1][~same_next] == 0)


@pytest.mark.parametrize("fill_rows", [False, True])
def test_resume_reproduces_exact_next_batches_across_epochs(documents, small_tokenizer, fill_rows):
    kwargs = dict(seq_len=SEQ_LEN, global_batch_size=BATCH, seed=3, fill_rows=fill_rows)
    docs = documents[:8]  # a couple of batches per epoch, so resumes cross epoch boundaries
    reference = make_loader(docs, small_tokenizer, **kwargs)
    states, batches, epochs = [], [], []
    for _ in range(14):
        states.append(json.dumps(reference.get_state()))
        batches.append(next(reference))
        epochs.append(reference.epoch)
    assert epochs[-1] >= 2, "the test must cross epoch boundaries"
    assert any(json.loads(s)["iterator"]["skip_tokens"] for s in states), "resume mid-document"
    for k in range(0, 10):
        resumed = make_loader(docs, small_tokenizer, **kwargs)
        resumed.set_state(states[k])
        assert_same([next(resumed) for _ in range(4)], batches[k:k + 4])


def test_epochs_visit_every_document_once_in_a_new_order(documents, small_tokenizer):
    def run(**kwargs):
        return segments(make_loader(documents, small_tokenizer, seq_len=256, global_batch_size=BATCH,
                                    **kwargs))
    encoded = [tuple(small_tokenizer.encode(d, bos=True, eos=True)) for d in documents]
    assert max(map(len, encoded)) <= 256
    assert run(num_epochs=1, shuffle=False) == encoded
    two_epochs = run(num_epochs=2, seed=5)
    first, second = two_epochs[:len(encoded)], two_epochs[len(encoded):]
    assert Counter(first) == Counter(second) == Counter(encoded)
    assert first != second and first != encoded


def test_finite_mode_stops_and_pads_last_batch(documents, small_tokenizer):
    loader = make_loader(documents, small_tokenizer, seq_len=SEQ_LEN, global_batch_size=BATCH,
                         num_epochs=1, fill_rows=True)
    batches = list(loader)
    total = sum(len(small_tokenizer.encode(d, bos=True, eos=True)) for d in documents)
    assert sum(int(np.count_nonzero(b["segment_ids"])) for b in batches) == total
    assert all(b["tokens"].shape == (BATCH, SEQ_LEN) for b in batches)
    with pytest.raises(StopIteration):
        next(loader)


def test_seed_determinism(documents, small_tokenizer):
    def first(seed):
        return next(make_loader(documents, small_tokenizer, seq_len=SEQ_LEN, global_batch_size=BATCH,
                                seed=seed))["tokens"]
    np.testing.assert_array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))


def test_processes_read_disjoint_documents(documents, small_tokenizer):
    kwargs = dict(seq_len=256, global_batch_size=BATCH, num_epochs=1, seed=0)
    per_process = []
    for index in range(2):
        loader = make_loader(documents, small_tokenizer, process_index=index, process_count=2, **kwargs)
        assert loader.local_batch_size == BATCH // 2
        per_process.append(segments(loader))
    assert not set(per_process[0]) & set(per_process[1])
    encoded = [tuple(small_tokenizer.encode(d, bos=True, eos=True)) for d in documents]
    assert Counter(per_process[0] + per_process[1]) == Counter(encoded)


def test_local_batches_concatenate_into_the_global_batch(documents, small_tokenizer):
    local = [next(make_loader(documents, small_tokenizer, seq_len=SEQ_LEN, global_batch_size=8,
                              process_index=i, process_count=2)) for i in range(2)]
    for key in BATCH_KEYS:
        assert np.concatenate([b[key] for b in local]).shape == (8, SEQ_LEN)
    # On this single process, to_global_batch turns the (whole) local batch into a sharded array.
    mesh = Mesh(np.array(jax.devices()).reshape(-1), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data", None))
    batch = next(make_loader(documents, small_tokenizer, seq_len=SEQ_LEN, global_batch_size=8))
    global_batch = to_global_batch(batch, sharding)
    for key in BATCH_KEYS:
        assert global_batch[key].shape == (8, SEQ_LEN) and global_batch[key].sharding == sharding
        np.testing.assert_array_equal(np.asarray(global_batch[key]), batch[key])


def test_state_from_another_setup_is_rejected(documents, small_tokenizer):
    loader = make_loader(documents, small_tokenizer, seq_len=SEQ_LEN, global_batch_size=BATCH)
    next(loader)
    other = make_loader(documents, small_tokenizer, seq_len=32, global_batch_size=BATCH)
    with pytest.raises(DataError, match="seq_len: saved 64, now 32"):
        other.set_state(loader.get_state())
    with pytest.raises(DataError, match="version"):
        other.set_state({"version": 99})


@pytest.mark.parametrize("kwargs, match", [
    (dict(global_batch_size=3, process_count=2, process_index=0), "multiple of process_count"),
    (dict(global_batch_size=4, process_count=2, process_index=2), r"not in \[0, 2\)"),
    (dict(global_batch_size=4, seq_len=1), "seq_len must be"),
    (dict(global_batch_size=4, num_epochs=0), "num_epochs"),
])
def test_bad_config(documents, small_tokenizer, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_loader(documents, small_tokenizer, **{"seq_len": SEQ_LEN, **kwargs})


def test_too_few_documents_for_processes(small_tokenizer):
    with pytest.raises(DataError, match="gets no documents"):
        make_loader(["only one"], small_tokenizer, seq_len=SEQ_LEN, global_batch_size=2,
                    process_index=1, process_count=2)


def test_sft_records_need_a_template(small_tokenizer):
    loader = make_loader([{"messages": []}], small_tokenizer, seq_len=SEQ_LEN, global_batch_size=1)
    with pytest.raises(DataError, match="sft_template"):
        next(loader)


def test_empty_documents_are_skipped(small_tokenizer):
    loader = make_loader(["", "hello there", "  \n"], small_tokenizer, seq_len=SEQ_LEN,
                         global_batch_size=1, num_epochs=1)
    assert segments(loader) == [tuple(small_tokenizer.encode("hello there", eos=True))]
    with pytest.raises(DataError, match="all 2 documents are empty"):
        make_loader(["", " "], small_tokenizer, seq_len=SEQ_LEN, global_batch_size=1)
    with pytest.raises(ConfigError, match="unknown sft_template"):
        make_loader(["x"], small_tokenizer, seq_len=SEQ_LEN, global_batch_size=1, sft_template="x")
