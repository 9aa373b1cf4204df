"""Per-row sampling filters against `generate.filter_logits` (itself checked against transformers'
TopK/TopP warpers in tests/test_sample.py), row by row with mixed settings in one batch."""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from llamax.infer.generate import filter_logits
from llamax.infer.row_sampling import filter_rows, make_sampling

VOCAB = 300
ROW = st.tuples(st.sampled_from([0, 1, 2, 7, 50, VOCAB]), st.sampled_from([1.0, 0.999, 0.9, 0.5, 0.05]))


def _batch(rows):
    parts = [make_sampling(1.0, k, p, seed=0) for k, p in rows]
    return jax.tree.map(lambda *xs: jnp.asarray(np.concatenate(xs)), *parts)


@settings(max_examples=60)
@given(rows=st.lists(ROW, min_size=1, max_size=6), seed=st.integers(0, 1000),
       scale=st.sampled_from([0.1, 1.0, 8.0]), ties=st.booleans())
def test_per_row_filters_keep_the_same_tokens_as_filter_logits(rows, seed, scale, ties):
    logits = np.random.RandomState(seed).randn(len(rows), VOCAB).astype(np.float32) * scale
    if ties:  # repeated values at every rank: the threshold must keep all of a tie
        logits = np.round(logits, 1)
    kept = np.isfinite(np.asarray(jax.jit(filter_rows)(jnp.asarray(logits), _batch(rows))))
    for row, (top_k, top_p) in enumerate(rows):
        expected = filter_logits(jnp.asarray(logits[row:row + 1]), top_k or None,
                                 top_p if top_p < 1 else None)
        np.testing.assert_array_equal(kept[row], np.isfinite(np.asarray(expected[0])), err_msg=str(rows[row]))
        assert kept[row].any()  # the likeliest token always survives


def test_negative_and_infinite_logits_order_correctly():
    logits = jnp.asarray([[-3.0, -np.inf, -0.5, -7.0, 2.0, -0.0, 0.0]], jnp.float32)
    for top_k, expected in [(2, [4, 5, 6]), (3, [4, 5, 6]), (4, [2, 4, 5, 6])]:  # -0.0 ties 0.0
        kept = np.isfinite(np.asarray(filter_rows(logits, _batch([(top_k, 1.0)]))))[0]
        assert np.flatnonzero(kept).tolist() == expected
        reference = filter_logits(logits, top_k)[0]
        assert np.flatnonzero(np.isfinite(np.asarray(reference))).tolist() == expected
