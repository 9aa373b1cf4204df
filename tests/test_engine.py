"""The continuous-batching engine against `llamax.sample.generate`: greedy and seeded outputs equal
whether a request runs alone or among others, stop ids, cancellation, compiled shapes, mesh."""
import threading

import jax
import numpy as np
import pytest

from llamax.config import get_preset
from llamax.errors import ConfigError, DataError
from llamax.infer.engine import Engine, SamplingParams
from llamax.infer.generate import uses_decode_kernels
from llamax.model import init_params
from llamax.sample import generate

TIMEOUT = 300  # seconds without an event before a test fails instead of hanging
NEW = 16  # one max_new_tokens for every reference call: generate compiles once per bucket
LENGTHS = (3, 9, 30, 17, 5, 60, 2, 40, 12, 33)  # prompt buckets 16, 32, 64


@pytest.fixture(scope="module")
def model():
    config = get_preset("tiny")
    return config, init_params(config, rng=0)


@pytest.fixture(scope="module")
def engine(model):
    config, params = model
    engine = Engine(config, params, max_batch=4, max_seq_len=512).start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def prompts(model):
    rng = np.random.RandomState(0)
    return [[1] + rng.randint(3, model[0].vocab_size, n - 1).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def reference(model, prompts):
    """generate()'s greedy continuation of each prompt, run alone."""
    config, params = model
    return [generate(config, params, [p], NEW)[0] for p in prompts]


def test_solo_greedy_equals_generate(engine, prompts, reference):
    # On CPU the engine decodes its 4 slots with the decode kernels and the trained layout where
    # they are built, else with [outputs, inputs] kernels: the same tokens as generate either way.
    config = engine.config
    thin = uses_decode_kernels(None, 4, config)
    assert engine.program.decode_config.kernel_layout == ("in_out" if thin else "out_in")
    up = engine.params["layers_0"]["mlp"]["up_proj"]["kernel"].shape
    assert up == ((config.hidden_size, config.intermediate_size) if thin else
                  (config.intermediate_size, config.hidden_size))
    for prompt, expected in zip(prompts, reference):
        request = engine.submit(prompt, SamplingParams(max_tokens=NEW))
        assert request.tokens(timeout=TIMEOUT) == expected
        assert request.finish_reason == "length" and request.completion_tokens == NEW


def test_more_requests_than_slots_each_get_their_solo_output(engine, prompts, reference):
    max_tokens = [NEW, 5, NEW, 1, 9, NEW, 3, 12, NEW, 7]  # finish at different steps: slots refill
    steps_before = engine.steps
    requests = [engine.submit(p, SamplingParams(max_tokens=m)) for p, m in zip(prompts, max_tokens)]
    outputs = [r.tokens(timeout=TIMEOUT) for r in requests]
    for output, expected, limit in zip(outputs, reference, max_tokens):
        assert output == expected[:limit]
    # Batched: far fewer decode steps than tokens (each request's first token comes from prefill).
    assert engine.steps - steps_before < sum(max_tokens) - len(prompts)
    assert engine.num_active == 0 and engine.num_waiting == 0


def test_a_long_request_among_short_ones_crosses_attention_windows(model, engine, prompts):
    """Windows of 128 then 256 cache positions as the long request grows (max_seq_len 512)."""
    config, params = model
    long_prompt = prompts[5] + prompts[7]  # 100 tokens + 200 new: windows 128 -> 256 -> 512
    assert engine.program.window_buckets() == [128, 256, 512]
    long = engine.submit(long_prompt, SamplingParams(max_tokens=200))
    short = [engine.submit(p, SamplingParams(max_tokens=NEW)) for p in prompts[:3]]
    assert long.tokens(timeout=TIMEOUT) == generate(config, params, [long_prompt], 200)[0]
    assert [r.tokens(timeout=TIMEOUT) for r in short] == [
        generate(config, params, [p], NEW)[0] for p in prompts[:3]]


def test_stop_ids_end_a_request_and_include_the_stop_token(engine, prompts, reference):
    stop = reference[2][4]
    cut = reference[2].index(stop)
    never = next(i for i in range(3, 256) if i not in reference[2])  # a second stop id, not produced
    request = engine.submit(prompts[2], SamplingParams(max_tokens=NEW, stop_ids=(never, stop)))
    assert request.tokens(timeout=TIMEOUT) == reference[2][:cut + 1]
    assert request.finish_reason == "stop"


def test_seeded_samples_equal_generate_while_sharing_steps_with_greedy(model, engine, prompts, reference):
    config, params = model
    settings = [dict(temperature=0.8, top_k=20, top_p=0.9, seed=3), dict(temperature=1.3, seed=11),
                dict(temperature=0.5, top_p=0.5, seed=5)]
    sampled = [engine.submit(prompts[i], SamplingParams(max_tokens=NEW, **s)) for i, s in enumerate(settings)]
    greedy = engine.submit(prompts[5], SamplingParams(max_tokens=NEW))
    outputs = [request.tokens(timeout=TIMEOUT) for request in sampled]
    for i, (output, s) in enumerate(zip(outputs, settings)):
        assert output == generate(config, params, [prompts[i]], NEW, **s)[0]
    assert greedy.tokens(timeout=TIMEOUT) == reference[5]
    # Different seeds give different samples (the property the seed exists for).
    other = engine.generate(prompts[0], SamplingParams(max_tokens=NEW, **dict(settings[0], seed=4)))
    assert other != outputs[0]


def test_logprobs_are_the_models_log_softmax(model, engine, prompts):
    from llamax.model import Llama

    config, params = model
    request = engine.submit(prompts[1], SamplingParams(max_tokens=6, logprobs=3))
    events = list(request)
    tokens = [e.token for e in events]
    logits = Llama(config).apply({"params": params}, np.asarray([prompts[1] + tokens]))[0]
    log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))[len(prompts[1]) - 1:-1]  # [6, vocab]
    for step, event in enumerate(events):
        np.testing.assert_allclose(event.logprob, log_probs[step, event.token], atol=1e-4)
        top_ids = [i for i, _ in event.top_logprobs]
        assert len(top_ids) == 3 and top_ids[0] == event.token  # greedy: the likeliest
        assert top_ids == np.argsort(-log_probs[step])[:3].tolist()


def test_cancel_frees_the_slot_and_others_continue(engine, prompts, reference):
    long = engine.submit(prompts[0], SamplingParams(max_tokens=100))
    first = next(iter(long))
    assert first.token == reference[0][0]
    others = [engine.submit(p, SamplingParams(max_tokens=NEW)) for p in prompts[1:6]]
    long.cancel()
    assert [e.finish_reason for e in long][-1] == "cancelled"
    assert long.completion_tokens < 100
    assert [r.tokens(timeout=TIMEOUT) for r in others] == reference[1:6]
    assert engine.num_active == 0


def test_sink_receives_events_on_the_engine_thread(engine, prompts, reference):
    events, done = [], threading.Event()

    def sink(event):
        events.append((threading.current_thread().name, event))
        if event.finish_reason:
            done.set()

    engine.submit(prompts[3], SamplingParams(max_tokens=NEW), sink=sink)
    assert done.wait(60)
    assert [e.token for _, e in events] == reference[3]
    assert {name for name, _ in events} == {"llamax-engine"}


@pytest.mark.parametrize("prompt, sampling, error, match", [
    ([], SamplingParams(), DataError, "prompt is empty"),
    ([1, 256], SamplingParams(), DataError, "outside the model vocabulary"),
    (["a"], SamplingParams(), DataError, "list of int token ids"),
    ([1] * 512, SamplingParams(), DataError, "leaves no room"),
    ([1] * 500, SamplingParams(max_tokens=13), DataError, "ask for at most 12 tokens"),
    ([1], SamplingParams(max_tokens=0), ConfigError, "max_tokens must be a positive"),
    ([1], SamplingParams(temperature=-1.0), ConfigError, "temperature must be >= 0"),
    ([1], SamplingParams(top_p=0.0), ConfigError, "top_p must be in"),
    ([1], SamplingParams(top_k=257), ConfigError, "top_k must be in"),
    ([1], SamplingParams(logprobs=6), ConfigError, "logprobs must be in"),
    ([1], SamplingParams(seed=-1), ConfigError, "seed must be in"),
    ([1], SamplingParams(stop_ids=(2, 256)), ConfigError, "stop id 256 is not a token id"),
])
def test_bad_requests_are_refused_before_they_reach_the_device(engine, prompt, sampling, error, match):
    with pytest.raises(error, match=match):
        engine.submit(prompt, sampling)
    assert engine.generate([1, 5], SamplingParams(max_tokens=2))  # still serving


def test_warmup_compiles_every_shape_once(model, prompts, reference):
    config, params = model
    engine = Engine(config, params, max_batch=2, max_seq_len=100)
    engine.warmup()
    compiled = lambda: (engine.program._prefill._cache_size(), engine.program._decode._cache_size())  # noqa: E731
    assert compiled() == (4, 2)  # prompt buckets 16, 32, 64, 128 capped at 100; row buckets 1, 2
    engine.start()
    try:
        outputs = [engine.generate(p, SamplingParams(max_tokens=NEW)) for p in prompts[:6]]
        assert outputs == reference[:6]
        assert len(engine.generate([1] * 80, SamplingParams(max_tokens=20))) == 20  # the 100 bucket
        assert compiled() == (4, 2)  # no request compiled anything
    finally:
        engine.stop()


def test_sharded_engine_equals_unsharded(model, prompts, reference):
    config, params = model
    devices = jax.devices()[:8]
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    engine = Engine(config, params, max_batch=4, max_seq_len=128, mesh=mesh).start()
    try:
        requests = [engine.submit(p, SamplingParams(max_tokens=NEW)) for p in prompts[:6]]
        assert [r.tokens(timeout=TIMEOUT) for r in requests] == reference[:6]
    finally:
        engine.stop()
    with pytest.raises(ConfigError, match="not divisible by the data-parallel size 4"):
        Engine(config, params, max_batch=6, max_seq_len=128, mesh=mesh)


def test_a_failing_step_ends_the_open_requests_and_the_engine_recovers(model, prompts, reference):
    config, params = model
    engine = Engine(config, params, max_batch=2, max_seq_len=128).start()
    decode = engine.program.decode
    calls = []

    def fail_once(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return decode(*args)

    engine.program.decode = fail_once
    try:
        requests = [engine.submit(p, SamplingParams(max_tokens=NEW)) for p in prompts[:3]]
        events = [list(r.events(timeout=TIMEOUT)) for r in requests]
        assert [e[-1].finish_reason for e in events] == ["error"] * 3  # two running, one waiting
        assert "RuntimeError: device lost" in events[0][-1].error
        assert engine.generate(prompts[0], SamplingParams(max_tokens=NEW)) == reference[0]
        waiting = [engine.submit(p, SamplingParams(max_tokens=NEW)) for p in prompts[:3]]
    finally:
        engine.stop()
    # Stopping ends whatever is still open, each with one final event.
    assert all(r.finish_reason in ("length", "cancelled") for r in waiting)
    with pytest.raises(RuntimeError, match="not running"):
        engine.submit(prompts[0])
