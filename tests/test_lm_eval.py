"""The `llamax` lm-eval backend against lm-eval's own `hf` backend (transformers, CPU, float32)
on the same random weights: per-request loglikelihoods, greedy flags, generated text and task
metrics, for every shipped task and through every checkpoint format; sharding; sampling; errors.
"""
import shutil

import jax
import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune_fixtures import compilation_cache_dir  # noqa: F401 (autouse: shared jit cache)
from lm_eval_fixtures import (MAX_LENGTH, TASKS, TOLERANCE, assert_same_results, evaluate, hf_reference,  # noqa: F401
                              lm_eval_hf_dir, make_run_dir, responses)
from llamax.convert.hub import convert, load_any
from llamax.errors import ConfigError, DataError
from llamax.infer.lm_eval_backend import LlamaxLM
from llamax.infer.lm_eval_tasks import run_tasks, task_manager
from llamax.model.llama import Llama
from llamax.sharding import MeshConfig, make_mesh
from llamax.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow


def llamax_args(checkpoint, **extra) -> str:
    args = {"checkpoint": checkpoint, "max_length": MAX_LENGTH, "batch_size": 4, **extra}
    return ",".join(f"{key}={value}" for key, value in args.items())


def test_llamax_equals_hf_backend_on_every_shipped_task(lm_eval_hf_dir, hf_reference):
    ours = evaluate("llamax", llamax_args(lm_eval_hf_dir))  # FSDP over the 8 test devices
    assert_same_results(ours, hf_reference)
    assert all(isinstance(text, str) for text in responses(ours, "shakespeare_qa"))


def test_orbax_params_checkpoint_and_run_directory_equal_hf_backend(lm_eval_hf_dir, hf_reference, tmp_path):
    orbax = convert(lm_eval_hf_dir, "hf", tmp_path / "orbax", "orbax", progress=False)
    ours = evaluate("llamax", llamax_args(orbax))  # tokenizer: the copy the conversion recorded
    assert_same_results(ours, hf_reference)
    run = make_run_dir(lm_eval_hf_dir, tmp_path / "run")
    ours = evaluate("llamax", llamax_args(run.path))  # tokenizer: the run's own copy
    assert_same_results(ours, hf_reference)


def test_8_devices_equal_1_device(lm_eval_hf_dir):
    config, params = load_any(lm_eval_hf_dir)
    tokenizer = load_tokenizer(lm_eval_hf_dir)
    results = []
    for mesh in (make_mesh(MeshConfig(), jax.devices()[:1]), make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))):
        lm = LlamaxLM.from_params(config, params, tokenizer, mesh=mesh, batch_size=4, max_length=MAX_LENGTH)
        results.append(evaluate(lm, None))
    for task in TASKS:
        one, eight = responses(results[0], task), responses(results[1], task)
        for a, b in zip(one, eight, strict=True):
            if isinstance(a, str):
                assert a == b
            else:
                a, b = (a, b) if isinstance(a, tuple) else ((a, None), (b, None))
                assert a[0] == pytest.approx(b[0], abs=1e-5, rel=1e-6) and a[1] == b[1]


# ---- single requests, edge cases, against the hf backend's LM object ---------------------

@pytest.fixture(scope="module")
def two_backends(lm_eval_hf_dir):
    """(hf, llamax) LM objects with a short max_length, so rolling windows and stops matter."""
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(lm_eval_hf_dir), device="cpu", dtype="float32", max_length=64, batch_size=3)
    ours = LlamaxLM(checkpoint=str(lm_eval_hf_dir), max_length=64, batch_size=3, check_every=4)
    return hf, ours


def requests(kind, arguments):
    return [Instance(kind, {}, args, index) for index, args in enumerate(arguments)]


def greedy_continuations(hf_dir, contexts):
    """The text of each context's greedy next token under transformers (is_greedy must be True)."""
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    continuations = []
    for context in contexts:
        with torch.no_grad():
            logits = model(torch.tensor([tokenizer.encode(context)])).logits[0, -1]
        continuations.append(tokenizer.decode([int(logits.argmax())]))
    return continuations


def test_loglikelihood_edge_cases_and_greedy_flags_match_hf(two_backends, lm_eval_hf_dir):
    hf, ours = two_backends
    contexts = ["ROMEO:\nO, she doth teach", "To be, or not to be", "KING"]
    arguments = [("", "To be, or not to be"),  # empty context: conditioned on the prefix token
                 ("ROMEO: ", "Hello there"),  # trailing space moves into the continuation
                 ("<|begin_of_text|>Once upon", " a time"),  # no second BOS
                 ("A <|eot_id|> B", " C"),  # special tokens spelled in text are parsed, as hf does
                 *zip(contexts, greedy_continuations(lm_eval_hf_dir, contexts))]
    theirs, mine = (lm.loglikelihood(requests("loglikelihood", arguments)) for lm in (hf, ours))
    for (a, a_greedy), (b, b_greedy) in zip(mine, theirs, strict=True):
        assert a == pytest.approx(b, **TOLERANCE) and a_greedy == b_greedy
    assert sum(greedy for _, greedy in mine) >= 2  # the greedy continuations are recognised


def test_rolling_windows_match_hf(two_backends):
    hf, ours = two_backends
    texts = [("Short text.",), ("Now is the winter of our discontent\n" * 20,)]  # 1 and ~6 windows of 64
    theirs, mine = (lm.loglikelihood_rolling(requests("loglikelihood_rolling", texts)) for lm in (hf, ours))
    assert mine == pytest.approx(theirs, rel=1e-6, abs=1e-4)


def test_generate_until_stop_sequences_and_max_gen_toks_match_hf(two_backends):
    hf, ours = two_backends
    arguments = [("ROMEO:\n", {"until": ["e"], "max_gen_toks": 20}),  # stops within a few tokens
                 ("To be, or not", {"until": [" the", "\n"], "max_gen_toks": 12}),
                 ("KING:", {"until": ["never appears"], "max_gen_toks": 9}),  # runs to max_gen_toks
                 ("Hark", {"until": "a", "max_new_tokens": 15, "do_sample": False}),
                 ("", {"until": ["zz"], "max_gen_toks": 5})]
    theirs, mine = (lm.generate_until(requests("generate_until", arguments)) for lm in (hf, ours))
    assert mine == theirs
    assert "e" not in mine[0] and len(ours.tok_encode(mine[2], add_special_tokens=False)) >= 8


def test_sampled_generation_is_seeded_and_chunking_does_not_change_it(lm_eval_hf_dir):
    config, params = load_any(lm_eval_hf_dir)
    tokenizer = load_tokenizer(lm_eval_hf_dir)
    sampled = {"until": ["\n\n"], "max_gen_toks": 24, "do_sample": True, "temperature": 1.0, "top_p": 0.95}
    arguments = [("ROMEO:\n", sampled), ("JULIET:\n", sampled), ("ROMEO:\n", {"until": ["\n\n"], "max_gen_toks": 24})]

    def run(**options):
        lm = LlamaxLM.from_params(config, params, tokenizer, batch_size=2, **options)
        return lm.generate_until(requests("generate_until", arguments))

    first = run(seed=1, check_every=16)
    assert run(seed=1, check_every=1) == first  # host stop checks between chunks change nothing
    assert run(seed=2) != first
    assert first[0] != first[2]  # sampled vs greedy from the same context
    assert all("\n\n" not in text for text in first)


# ---- bad input ----------------------------------------------------------------------------

def test_unknown_task_names_the_task(lm_eval_hf_dir):
    with pytest.raises(ConfigError, match=r"unknown lm-eval task\(s\) \['shakespeare_mcq'\]"):
        task_manager(["shakespeare_mc", "shakespeare_mcq"])


def test_checkpoint_without_tokenizer_asks_for_one(lm_eval_hf_dir, tmp_path):
    orbax = convert(lm_eval_hf_dir, "hf", tmp_path / "orbax", "orbax", progress=False)
    shutil.rmtree(orbax / "tokenizer")  # a params checkpoint written before tokenizers were recorded
    with pytest.raises(DataError, match="has no tokenizer of its own.*tokenizer=PATH"):
        LlamaxLM(checkpoint=str(orbax))


def test_context_longer_than_max_length_is_an_error_unless_truncating(lm_eval_hf_dir, two_backends):
    hf, _ = two_backends
    short = LlamaxLM(checkpoint=str(lm_eval_hf_dir), max_length=32, batch_size=2)
    long_request = requests("loglikelihood", [("word " * 40, " end")])
    with pytest.raises(DataError, match=r"has \d+ tokens .* more than max_length \+ 1 = 33.*truncate_left=True"):
        short.loglikelihood(long_request)
    with pytest.raises(DataError, match=r"generation context has \d+ tokens.*max_length - max_gen_toks = 22"):
        short.generate_until(requests("generate_until", [("word " * 40, {"until": ["\n"], "max_gen_toks": 10})]))
    # truncate_left=True cuts like the hf backend (whose max_length is 64 here).
    truncating = LlamaxLM(checkpoint=str(lm_eval_hf_dir), max_length=64, batch_size=2, truncate_left=True)
    long_request = requests("loglikelihood", [("word " * 100, " end")])
    (mine,), (theirs,) = truncating.loglikelihood(long_request), hf.loglikelihood(long_request)
    assert mine[0] == pytest.approx(theirs[0], **TOLERANCE) and mine[1] == theirs[1]


def test_empty_task_file_is_a_clear_error(lm_eval_hf_dir, tmp_path):
    import shutil

    from llamax.infer.lm_eval_tasks import DEFAULT_INCLUDE_PATH

    (tmp_path / "data").mkdir()
    shutil.copy(DEFAULT_INCLUDE_PATH / "shakespeare.py", tmp_path)
    (tmp_path / "data" / "empty.jsonl").write_text("")
    yaml = (DEFAULT_INCLUDE_PATH / "shakespeare_mc.yaml").read_text()
    (tmp_path / "empty_mc.yaml").write_text(yaml.replace("task: shakespeare_mc", "task: empty_mc")
                                            .replace("shakespeare_mc.jsonl", "empty.jsonl").replace("tag: shakespeare", ""))
    lm = LlamaxLM.from_params(*load_any(lm_eval_hf_dir), load_tokenizer(lm_eval_hf_dir), batch_size=2)
    with pytest.raises(ValueError, match="empty.jsonl holds no documents"):
        run_tasks(lm, ["empty_mc"], include_path=tmp_path)


def test_bad_model_args_are_named(lm_eval_hf_dir):
    with pytest.raises(ConfigError, match=r"unknown llamax model args \['batchsize'\]; valid: checkpoint"):
        LlamaxLM(checkpoint=str(lm_eval_hf_dir), batchsize=4)
    with pytest.raises(ConfigError, match="fixed integer batch size"):
        LlamaxLM(checkpoint=str(lm_eval_hf_dir), batch_size="auto")
    with pytest.raises(ConfigError, match="needs checkpoint=PATH"):
        LlamaxLM()
    with pytest.raises(ConfigError, match="DATAxFSDPxTENSOR"):
        LlamaxLM(checkpoint=str(lm_eval_hf_dir), mesh="eight")


def test_scorer_matches_a_direct_forward_pass(lm_eval_hf_dir):
    """Batching (sorting, bucketed padding, fixed rows, dedup) and the shared-context path (one
    context, several continuations, through a KV cache) change no number."""
    from llamax.infer.scoring import SequenceScorer

    config, params = load_any(lm_eval_hf_dir)
    rng = np.random.RandomState(0)
    tokens = lambda n: rng.randint(0, 1024, n).tolist()  # noqa: E731
    shared_context, one_token_context = tokens(21), tokens(9)
    greedy_next = int(np.asarray(Llama(config).apply({"params": params}, np.asarray([one_token_context])))[0, -1].argmax())
    requests = [(tokens(3), tokens(2)), (tokens(30), tokens(10)), (tokens(16), tokens(1)),
                (shared_context, tokens(4)), (shared_context, tokens(1)), (shared_context, tokens(12)),
                (one_token_context, [greedy_next]), (one_token_context, tokens(1)), (tokens(60), tokens(30))]
    requests.append(requests[1])  # a duplicate
    scorer = SequenceScorer(config, batch_size=3, max_length=MAX_LENGTH)
    scored = scorer.score(scorer.place(params), requests)
    for (context, continuation), (log_prob, greedy) in zip(requests, scored, strict=True):
        sequence = np.asarray(context + continuation)
        logits = np.asarray(Llama(config).apply({"params": params}, sequence[None, :-1]))[0]
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        targets = sequence[1:]
        count = len(continuation)
        assert log_prob == pytest.approx(log_probs[np.arange(len(targets)), targets][-count:].sum(), abs=1e-4)
        assert greedy == bool(np.all(logits.argmax(-1)[-count:] == targets[-count:]))
    assert scored[6][1]  # the shared path recognises the greedy token
