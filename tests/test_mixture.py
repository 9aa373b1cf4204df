"""Weighted mixtures (llamax.data.mixture): realized per-source token shares within 1% of the
weights over 200 steps, a deterministic interleave from the seed, exact resume mid-mixture (also
after a small source's epoch ends), and one clear error for weights that do not sum to a positive
number."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_fixtures import small_tokenizer  # noqa: F401 (fixture)
from experiments import train as train_cli
from llamax.data.corpus import shakespeare_passages
from llamax.data.pipeline import DataConfig, loader_metrics, train_loader
from llamax.errors import ConfigError

SEQ_LEN, BATCH = 64, 8


@pytest.fixture
def sources(tmp_path):
    """A big source (the bundled plays) and a small Parquet one (a few epochs in 200 steps)."""
    rows = [{"text": text[:400]} for text in shakespeare_passages("validation")[:30]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "small.parquet", row_group_size=8)
    return "shakespeare", str(tmp_path / "small.parquet")


def mixture_loader(tokenizer, sources, weights, seed=0):
    data = DataConfig(tokenizer=str(tokenizer.path), train=list(zip(sources, weights)))
    return train_loader(data, tokenizer, SEQ_LEN, BATCH, seed)


def test_realized_token_shares_are_within_one_percent_over_200_steps(small_tokenizer, sources):  # noqa: F811
    weights = (0.7, 0.3)
    loader = mixture_loader(small_tokenizer, sources, weights)
    tokens = 0
    for _ in range(200):
        tokens += int(np.count_nonzero(next(loader)["segment_ids"]))
    counts = loader_metrics(loader)
    assert sum(counts.values()) == tokens  # the log's counts are the batches' tokens
    shares = np.asarray([counts["tokens/shakespeare"], counts["tokens/small"]]) / tokens
    assert np.abs(shares - weights).max() < 0.01, shares
    assert loader.loaders[1].epoch >= 2  # the small source went round several times


def test_the_interleave_is_a_function_of_the_seed(small_tokenizer, sources):  # noqa: F811
    def first_batches(seed):
        loader = mixture_loader(small_tokenizer, sources, (1, 1), seed)
        return np.stack([next(loader)["tokens"] for _ in range(3)])

    np.testing.assert_array_equal(first_batches(5), first_batches(5))
    assert not np.array_equal(first_batches(5), first_batches(6))


def test_resume_mid_mixture_is_exact_across_a_small_sources_epochs(small_tokenizer, sources):  # noqa: F811
    weights = (0.5, 0.5)
    uninterrupted = mixture_loader(small_tokenizer, sources, weights)
    expected = [next(uninterrupted) for _ in range(60)]
    cut = mixture_loader(small_tokenizer, sources, weights)
    for _ in range(25):
        next(cut)
    epoch_at_cut = cut.loaders[1].epoch
    state = json.loads(json.dumps(cut.get_state()))  # through JSON, as a checkpoint keeps it
    resumed = mixture_loader(small_tokenizer, sources, weights)
    resumed.set_state(state)
    for want in expected[25:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert resumed.loaders[1].epoch > epoch_at_cut  # the resumed part crossed an epoch boundary
    assert loader_metrics(resumed) == loader_metrics(uninterrupted)
    changed = mixture_loader(small_tokenizer, sources, (0.6, 0.4))
    with pytest.raises(Exception, match="saved mixture"):
        changed.set_state(state)


@pytest.mark.parametrize("train,match", [
    ([("shakespeare", 0.0), ("x.parquet", 0)], "sum to 0.0, not a positive number"),
    ([("shakespeare", -1.0), ("x.parquet", 2.0)], "weight -1.0"),
    ([("shakespeare", float("nan"))], "weight nan"),
    ([("shakespeare",)], r"\(source, weight\) pair"),
    ([("shakespeare", 1), ("shakespeare", 2)], "more than once"),
])
def test_bad_mixture_weights_are_one_clear_error(train, match):
    with pytest.raises(ConfigError, match=match):
        DataConfig(tokenizer="t.model", train=train)


def test_a_bad_mixture_on_the_command_line_is_one_line_and_writes_nothing(tmp_path, capsys):
    code = train_cli.main(["--gin_file=configs/runs/tiny.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
                           "--gin.TRAIN_DATA=[('shakespeare', 0), ('shakespeare_sft', 0)]"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "not a positive number" in err, err
    assert not (tmp_path / "run").exists()
