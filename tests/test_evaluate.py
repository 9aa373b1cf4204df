"""Perplexity: equals exp of the mean token NLL that the HF PyTorch model gives on the same packed
tokens (only loss_mask tokens counted), packed documents do not leak into each other, and the
`experiments.eval` CLI reads run directories (appending to their metrics) and rejects a tokenizer
larger than the model's vocabulary."""
import json
import math

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from data_fixtures import small_tokenizer  # noqa: F401 (fixture)
from experiments import eval as eval_cli
from finetune_fixtures import TINY, compilation_cache_dir, save_hf_model, tiny_hf_dir  # noqa: F401
from llamax.train.checkpoint import Checkpointer
from llamax.convert.hub import load_any
from llamax.data.corpus import shakespeare_passages
from llamax.data.loader import LoaderConfig, make_loader
from llamax.data.packing import as_document, pack_documents, stack_rows
from llamax.errors import DataError
from llamax.infer.evaluate import evaluate_perplexity
from llamax.run_dir import write_model_config
from llamax.train.metrics import read_metrics

SEQ, BATCH = 64, 8


def validation_batches(tokenizer, max_batches: int = 1, passage_chars: int = 2000) -> list[dict]:
    """Packed rows of the held-out plays, as `experiments.eval` builds them."""
    documents = shakespeare_passages("validation", passage_chars)
    loader = make_loader(documents, tokenizer, LoaderConfig(
        seq_len=SEQ, global_batch_size=BATCH, shuffle=False, num_epochs=1, fill_rows=True))
    return [batch for _, batch in zip(range(max_batches), loader)]


def torch_nll(hf_model, batch: dict) -> tuple[float, float]:
    """(summed NLL, scored tokens) with the HF model run on each packed segment on its own."""
    total, count = 0.0, 0.0
    for row in range(batch["tokens"].shape[0]):
        for segment in sorted(set(batch["segment_ids"][row]) - {0}):
            where = batch["segment_ids"][row] == segment
            with torch.no_grad():
                logits = hf_model(torch.as_tensor(batch["tokens"][row][where][None])).logits[0]
            log_probs = torch.log_softmax(logits.double(), dim=-1).numpy()  # [segment, vocab]
            mask = batch["loss_mask"][row][where]
            picked = log_probs[np.arange(len(mask)), batch["targets"][row][where]]
            total -= float(np.sum(picked * mask))
            count += float(mask.sum())
    return total, count


def test_perplexity_is_exp_of_the_mean_nll_of_the_hf_model(tiny_hf_dir, small_tokenizer):  # noqa: F811
    batches = validation_batches(small_tokenizer, passage_chars=1)  # one speech per document
    assert (batches[0]["segment_ids"].max(axis=1) > 1).any()  # rows really hold several segments
    config, params = load_any(tiny_hf_dir)
    result = evaluate_perplexity(config, params, batches)
    hf_model = LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    total, count = torch_nll(hf_model, batches[0])
    assert result["tokens"] == count == batches[0]["loss_mask"].sum()
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_packed_documents_give_the_same_nll_as_evaluated_alone(tiny_hf_dir):  # noqa: F811
    config, params = load_any(tiny_hf_dir)
    rng = np.random.default_rng(0)
    documents = [as_document(rng.integers(3, TINY.vocab_size, n)) for n in (23, 31)]
    packed = stack_rows(list(pack_documents(documents, SEQ)), BATCH)  # both in row 0
    assert set(packed["segment_ids"][0]) == {0, 1, 2}
    alone = stack_rows([next(pack_documents([document], SEQ)) for document in documents], BATCH)
    together, apart = (evaluate_perplexity(config, params, [b]) for b in (packed, alone))
    assert together["tokens"] == apart["tokens"] == 22 + 30
    assert together["loss"] == pytest.approx(apart["loss"], rel=1e-6)


def make_run_dir(path, config, params, step: int):
    """A run directory as `llamax.train.fit` leaves it, holding `params` at checkpoint `step`."""
    path.mkdir()
    write_model_config(path, config)
    state = {"step": np.asarray(step, np.int32), "params": params}
    with Checkpointer(path / "checkpoints", async_save=False) as checkpointer:
        checkpointer.save(step, state, {"step": step}, force=True)
    return path


def test_eval_cli_on_a_run_dir_prints_json_and_appends_to_its_metrics(  # noqa: F811
        tiny_hf_dir, small_tokenizer, tmp_path, capsys):
    config, params = load_any(tiny_hf_dir)
    run_dir = make_run_dir(tmp_path / "run", config, params, step=7)
    code = eval_cli.main(["--checkpoint", str(run_dir), "--tokenizer", str(small_tokenizer.path),
                          "--seq_len", str(SEQ), "--batch_size", str(BATCH), "--max_batches", "2"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = evaluate_perplexity(config, params, validation_batches(small_tokenizer, 2))
    assert printed["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert printed["tokens"] == expected["tokens"] and printed["step"] == 7
    (record,) = read_metrics(run_dir)
    # The training loop's record shape (one logger for both): flat eval_* keys.
    assert record["step"] == 7 and record["eval_perplexity"] == printed["perplexity"]
    assert record["eval_data"] == "shakespeare" and record["eval_split"] == "validation"


def test_eval_with_a_tokenizer_larger_than_the_model_vocab_fails_clearly(  # noqa: F811
        small_tokenizer, tmp_path, capsys):
    small_model = save_hf_model(tmp_path / "vocab128", vocab_size=128)
    code = eval_cli.main(["--checkpoint", str(small_model), "--tokenizer", str(small_tokenizer.path)])
    assert code == 1
    assert "DataError" in capsys.readouterr().err
    with pytest.raises(DataError, match="has 512 pieces but the model's vocab_size is 128"):
        eval_cli.evaluate_checkpoint(eval_cli.parse_args(
            ["--checkpoint", str(small_model), "--tokenizer", str(small_tokenizer.path)]))


def test_eval_prints_its_result_even_when_the_run_cannot_take_it(  # noqa: F811
        tiny_hf_dir, small_tokenizer, tmp_path, capsys):
    """A perplexity that took minutes to compute is printed before the append to the run's
    metrics is attempted, so a failing write (here the metrics file is a folder) loses nothing."""
    config, params = load_any(tiny_hf_dir)
    run_dir = make_run_dir(tmp_path / "run", config, params, step=7)
    (run_dir / "metrics.jsonl").mkdir()
    code = eval_cli.main(["--checkpoint", str(run_dir), "--tokenizer", str(small_tokenizer.path),
                          "--seq_len", str(SEQ), "--batch_size", str(BATCH), "--max_batches", "1"])
    captured = capsys.readouterr()
    assert code == 1
    assert json.loads(captured.out.strip().splitlines()[-1])["step"] == 7
    assert "could not append the result to the run's metrics" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_eval_cli_takes_the_tokenizer_the_run_recorded(  # noqa: F811
        tiny_hf_dir, small_tokenizer, tmp_path, capsys):
    from llamax.run_dir import write_tokenizer

    config, params = load_any(tiny_hf_dir)
    run_dir = make_run_dir(tmp_path / "run", config, params, step=3)
    args = ["--seq_len", str(SEQ), "--batch_size", str(BATCH), "--max_batches", "1"]
    assert eval_cli.main(["--checkpoint", str(run_dir), *args]) == 1  # it recorded none (yet)
    assert "has no tokenizer of its own" in capsys.readouterr().err
    write_tokenizer(run_dir, small_tokenizer.path)  # what `fit` does when it commits the run
    assert eval_cli.main(["--checkpoint", str(run_dir), *args]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = evaluate_perplexity(config, params, validation_batches(small_tokenizer, 1))
    assert printed["loss"] == pytest.approx(expected["loss"], rel=1e-6)
