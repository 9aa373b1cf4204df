"""Packing: property tests over random document lengths, seq_len and both packing modes."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamax.data.packing import (BATCH_DTYPES, BATCH_KEYS, DocumentPacker, RowBuilder, as_document,
                                 pack_documents, stack_rows)
from llamax.errors import ConfigError, DataError


def make_documents(lengths, weight_seed=0):
    """Document d's token i is 1000 * (d + 1) + i, so every token says where it came from."""
    rng = np.random.default_rng(weight_seed)
    return [as_document(1000 * (d + 1) + np.arange(n), rng.integers(0, 2, n))
            for d, n in enumerate(lengths)]


def segments_of(row):
    """[(tokens, weights-of-targets...)] per segment; also checks the row's own invariants."""
    seg = row["segment_ids"]
    used = int(np.count_nonzero(seg))
    assert np.all(seg[used:] == 0), "padding only at the end of a row"
    out = []
    for k in range(1, seg.max() + 1):
        index = np.flatnonzero(seg == k)
        assert len(index) and np.all(np.diff(index) == 1), "segments are contiguous"
        assert index[0] == (0 if k == 1 else out[-1][1] + 1), "segments are consecutive"
        out.append((index[0], index[-1]))
    assert sum(end - start + 1 for start, end in out) == used
    return [row["tokens"][start:end + 1] for start, end in out], out


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 100), min_size=1, max_size=12),
       seq_len=st.integers(2, 40), fill_rows=st.booleans())
def test_packing_invariants(lengths, seq_len, fill_rows):
    documents = make_documents(lengths)
    rows = list(pack_documents(documents, seq_len, fill_rows=fill_rows))
    weights_by_token = {int(t): w for tokens, weights in documents for t, w in zip(tokens, weights)}
    pieces = []
    for row in rows:
        assert set(row) == set(BATCH_KEYS)
        for key in BATCH_KEYS:
            assert row[key].shape == (seq_len,) and row[key].dtype == BATCH_DTYPES[key]
        segments, spans = segments_of(row)
        expected_targets = np.zeros(seq_len, np.int32)
        expected_mask = np.zeros(seq_len, np.float32)
        for tokens, (start, end) in zip(segments, spans):
            doc = tokens // 1000
            assert np.all(doc == doc[0]), "a segment never mixes documents"
            assert np.all(np.diff(tokens) == 1), "a segment is a contiguous run of one document"
            np.testing.assert_array_equal(row["positions"][start:end + 1], np.arange(end - start + 1))
            expected_targets[start:end] = tokens[1:]
            expected_mask[start:end] = [weights_by_token[int(t)] for t in tokens[1:]]
            pieces.append(tokens)
        np.testing.assert_array_equal(row["targets"], expected_targets)
        np.testing.assert_array_equal(row["loss_mask"], expected_mask)
        assert np.all(row["tokens"][row["segment_ids"] == 0] == 0)
    # Nothing lost, duplicated or reordered.
    np.testing.assert_array_equal(np.concatenate(pieces), np.concatenate([t for t, _ in documents]))
    if not fill_rows:
        # Short documents are whole segments; long ones are cut into aligned seq_len chunks.
        for piece in pieces:
            offset = piece[0] % 1000
            assert offset % seq_len == 0
            assert len(piece) == min(seq_len, lengths[piece[0] // 1000 - 1] - offset)
    else:
        for row in rows[:-1]:  # only the last row, or a 1-token gap, may be padded
            assert np.count_nonzero(row["segment_ids"]) >= seq_len - 1
    total = sum(lengths)
    assert len(rows) >= -(-total // seq_len)


def test_hand_worked_example():
    docs = [as_document([1, 5, 6, 2]), as_document([1, 7, 2]), as_document([1, 8, 9, 10, 11, 2])]
    rows = list(pack_documents(docs, seq_len=8))
    assert len(rows) == 2
    np.testing.assert_array_equal(rows[0]["tokens"], [1, 5, 6, 2, 1, 7, 2, 0])
    np.testing.assert_array_equal(rows[0]["targets"], [5, 6, 2, 0, 7, 2, 0, 0])
    np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 1, 2, 2, 2, 0])
    np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 3, 0, 1, 2, 0])
    np.testing.assert_array_equal(rows[0]["loss_mask"], [1, 1, 1, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(rows[1]["tokens"], [1, 8, 9, 10, 11, 2, 0, 0])
    filled = list(pack_documents(docs, seq_len=8, fill_rows=True))
    np.testing.assert_array_equal(filled[0]["tokens"], [1, 5, 6, 2, 1, 7, 2, 0])  # 1-token gap
    np.testing.assert_array_equal(filled[0]["segment_ids"], [1, 1, 1, 1, 2, 2, 2, 0])
    filled = list(pack_documents(docs, seq_len=6, fill_rows=True))
    np.testing.assert_array_equal(filled[1]["tokens"], [2, 1, 8, 9, 10, 11])  # doc 2's end, doc 3
    np.testing.assert_array_equal(filled[1]["segment_ids"], [1, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(filled[1]["loss_mask"], [0, 1, 1, 1, 1, 0])


def test_long_document_is_chunked_not_dropped():
    rows = list(pack_documents([as_document(np.arange(1, 11))], seq_len=4))
    np.testing.assert_array_equal(np.concatenate([r["tokens"] for r in rows]),
                                  [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 0])
    np.testing.assert_array_equal(rows[1]["positions"], [0, 1, 2, 3])
    np.testing.assert_array_equal(rows[0]["loss_mask"], [1, 1, 1, 0])  # cut transition unscored


def test_packer_resumes_from_offset():
    tokens, weights = as_document(np.arange(1, 20))
    packer = DocumentPacker(seq_len=8)
    packer.set_document(tokens, weights, offset=8)
    assert packer.place() is False
    np.testing.assert_array_equal(packer.finish_row()["tokens"], np.arange(9, 17))


def test_stack_rows_pads_with_empty_rows():
    rows = list(pack_documents([as_document([1, 2, 3])], seq_len=4))
    batch = stack_rows(rows, batch_size=3)
    assert batch["tokens"].shape == (3, 4) and batch["loss_mask"].dtype == np.float32
    assert not batch["segment_ids"][1:].any() and not batch["loss_mask"][1:].any()


def test_bad_arguments():
    with pytest.raises(ConfigError, match="seq_len must be >= 2"):
        RowBuilder(1)
    with pytest.raises(DataError, match="equal length"):
        as_document([1, 2, 3], [1, 1])
    with pytest.raises(DataError, match="does not fit"):
        RowBuilder(4).add(np.arange(5), np.ones(5))
