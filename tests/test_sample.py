"""Generation against transformers' `generate`, KV-cache consistency, samplers, sharding, errors."""
import functools

import jax
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from transformers import GenerationConfig
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from hf_models import make_hf_model
from llamax.config import ModelConfig
from llamax.convert import hf_to_params, save_hf
from llamax.errors import ConfigError, DataError, LlamaxError
from llamax.model import Llama
from llamax.infer.generate import (Sampler, _compiled_generate, bucket_length, decode_kernel_layout, decode_step,
                                   decoding_config,
                           filter_logits, generate, generate_stream, left_pad, prefill, sample_tokens,
                           decoding_params)

PROMPT_LENGTHS = (3, 9, 30)  # ragged; 30 + new tokens crosses llama31_scaled's original context 32
NEW = 12  # one max_new_tokens (and one prompt bucket) for most tests: they share executables


def _from_hf(model):
    config = ModelConfig.from_hf(model.config.to_dict())
    return config, hf_to_params(config, {k: v.numpy() for k, v in model.state_dict().items()})


def _prompts(vocab_size, lengths=PROMPT_LENGTHS, seed=0):
    rng = np.random.RandomState(seed)
    return [[1] + rng.randint(3, vocab_size, n - 1).tolist() for n in lengths]


def _hf_generate(model, prompt, max_new_tokens, eos_id=None):
    """transformers' greedy decoding of one unpadded prompt; new tokens only."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id,
                              pad_token_id=0, bos_token_id=1)
    inputs = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), generation_config=config)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def gqa():
    model = make_hf_model("llama3_gqa")
    return (model, *_from_hf(model))


@pytest.mark.parametrize("variant", ["llama2_mha", "llama3_gqa", "llama31_scaled"])
def test_greedy_matches_transformers_on_a_ragged_batch(variant):
    model = make_hf_model(variant)
    config, params = _from_hf(model)
    prompts = _prompts(config.vocab_size)
    ours = generate(config, params, prompts, NEW)
    for prompt, tokens in zip(prompts, ours):
        assert tokens == _hf_generate(model, prompt, NEW)


def test_rows_stop_at_eos_like_transformers(gqa):
    model, config, params = gqa
    prompts = _prompts(config.vocab_size)
    free = generate(config, params, prompts, NEW)
    # A token greedy decoding really produces, first seen at step 3 of row 0.
    eos_id = next(t for i, t in enumerate(free[0]) if i >= 3 and t not in free[0][:i])
    stopped = generate(config, params, prompts, NEW, eos_id=eos_id)
    assert stopped[0] == free[0][:free[0].index(eos_id) + 1] and stopped[0][-1] == eos_id
    for prompt, ours, unstopped in zip(prompts, stopped, free):
        assert ours == _hf_generate(model, prompt, NEW, eos_id=eos_id)
        assert ours == (unstopped[:unstopped.index(eos_id) + 1] if eos_id in unstopped else unstopped)
    # eos as the very first new token: that row returns just it.
    assert generate(config, params, prompts, NEW, eos_id=free[0][0])[0] == [free[0][0]]


def test_rows_stop_at_any_stop_id_like_transformers_eos_list(gqa):
    """Llama-3-Instruct stops at <|eot_id|> or <|end_of_text|>: transformers takes a list of eos ids."""
    model, config, params = gqa
    prompts = _prompts(config.vocab_size)
    free = generate(config, params, prompts, NEW)
    # Two tokens greedy decoding really produces, first seen late in rows 0 and 2.
    stops = [next(t for i, t in enumerate(row) if i >= 4 and t not in row[:i]) for row in (free[0], free[2])]
    stopped = generate(config, params, prompts, NEW, stop_ids=stops)
    for prompt, ours, unstopped in zip(prompts, stopped, free):
        assert ours == _hf_generate(model, prompt, NEW, eos_id=stops)
        ends = [i for i, t in enumerate(unstopped) if t in stops]
        assert ours == (unstopped[:ends[0] + 1] if ends else unstopped)
    assert stopped[0][-1] in stops and len(stopped[0]) < NEW
    # eos_id and stop_ids together: any of them ends a row; the stream agrees with the batch.
    both = generate(config, params, prompts, NEW, eos_id=stops[0], stop_ids=stops[1:])
    assert both == stopped
    assert list(generate_stream(config, params, prompts[0], NEW, stop_ids=stops)) == stopped[0]


def test_a_stop_callback_cuts_rows_as_the_plain_loop_would_and_keeps_samples(gqa):
    _, config, params = gqa
    prompts = _prompts(config.vocab_size)
    free = generate(config, params, prompts, NEW)
    # The host asks `stop` every 3 tokens; row 0 ends once it holds 4, i.e. at the check after 6.
    asked = []

    def stop(row, tokens):
        asked.append((row, len(tokens)))
        return row == 0 and len(tokens) >= 4

    chunked = generate(config, params, prompts, NEW, stop=stop, check_every=3)
    assert chunked[0] == free[0][:6] and chunked[1:] == free[1:]
    assert asked[:3] == [(0, 3), (1, 3), (2, 3)] and (0, 9) not in asked
    # check_every=1 asks after every token and still ends (it once looped forever).
    assert generate(config, params, prompts, NEW, stop=lambda row, tokens: False, check_every=1) == free
    # Stop ids and the callback together: a row ends at whichever comes first.
    stops = [free[1][5]]
    plain = generate(config, params, prompts, NEW, stop_ids=stops)
    assert generate(config, params, prompts, NEW, stop_ids=stops, stop=stop, check_every=3)[1:] == plain[1:]
    # Chunking never changes a sample: row r's step-s draw uses the same key either way.
    sampled = dict(temperature=1.0, top_p=0.9, seed=3)
    assert generate(config, params, prompts, NEW, stop=lambda row, tokens: False, check_every=2, **sampled) == \
        generate(config, params, prompts, NEW, **sampled)
    with pytest.raises(ConfigError, match="check_every"):
        generate(config, params, prompts, NEW, stop=stop, check_every=0)


def test_kv_cache_logits_equal_full_forward_across_prefill_and_decode(gqa):
    _, config, params = gqa
    params = jax.jit(functools.partial(decoding_params, config))(params)
    config = decoding_config(config)
    sequences = _prompts(config.vocab_size, lengths=(9, 14, 11), seed=1)
    prompt_lengths = (3, 8, 5)  # then 6 decode steps each, teacher-forced
    tokens, positions, segment_ids = left_pad(
        [np.array(s[:n]) for s, n in zip(sequences, prompt_lengths)], length=8)
    logits, cache = jax.jit(functools.partial(prefill, config), static_argnums=4)(
        params, tokens, positions, segment_ids, 16)
    step = jax.jit(functools.partial(decode_step, config))
    cached = [list(np.asarray(logits[row, 8 - n:])) for row, n in enumerate(prompt_lengths)]
    next_positions = positions[:, -1] + 1
    for t in range(6):
        fed = np.array([s[n + t] for s, n in zip(sequences, prompt_lengths)])
        step_logits, cache = step(params, fed, next_positions + t, cache)
        for row in range(3):
            cached[row].append(np.asarray(step_logits[row]))
    # Reference: each sequence alone, right-padded to 14 (causal: padding never changes them).
    right_padded = np.array([s + [0] * (14 - len(s)) for s in sequences])
    full = jax.jit(lambda p, t: Llama(config).apply({"params": p}, t))(params, right_padded)
    for row, sequence in enumerate(sequences):
        np.testing.assert_allclose(np.stack(cached[row]), full[row, :len(sequence)], atol=1e-5)


def test_compiles_once_per_bucket(gqa):
    _, config, params = gqa
    assert bucket_length(5) == bucket_length(11) == 16 and bucket_length(300) == 512
    assert bucket_length(17) == bucket_length(32) == 32
    generate(config, params, _prompts(config.vocab_size), NEW)  # batch 3 -> 4, length 30 -> 32
    generate(config, params, _prompts(config.vocab_size, lengths=(20, 2, 17, 5), seed=3), NEW)
    compiled = _compiled_generate(config, Sampler(True, None, None), NEW, None, None,
                                  decode_kernel_layout(None, 4))
    assert compiled._cache_size() == 1


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), top_k=st.one_of(st.none(), st.integers(1, 64)),
       top_p=st.one_of(st.none(), st.floats(0.01, 1.0)), scale=st.floats(0.1, 10.0))
@example(seed=0, top_k=None, top_p=0.9999999999999999, scale=3.0)  # float32 rounding near top_p=1
def test_filter_logits_matches_transformers_warpers(seed, top_k, top_p, scale):
    logits = np.random.RandomState(seed % 2**31).randn(4, 64).astype(np.float32) * scale
    expected = torch.from_numpy(logits.copy())
    if top_k is not None:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p is not None:
        expected = TopPLogitsWarper(top_p)(None, expected)
    ours = np.asarray(filter_logits(logits, top_k, top_p))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected.numpy()))
    np.testing.assert_array_equal(ours[np.isfinite(ours)], logits[np.isfinite(ours)])


@pytest.mark.parametrize("top_k, top_p, allowed", [(3, None, {0, 1, 2}), (None, 0.75, {0, 1, 2}),
                                                     (None, 0.5, {0, 1}), (4, 0.9, {0, 1, 2, 3})])
def test_samples_never_leave_the_top_k_set_or_the_nucleus(top_k, top_p, allowed):
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02], np.float32)  # nucleus(0.75) = 3 tokens
    rows = np.tile(np.log(probs), (4096, 1))  # each row draws with its own key
    draws = np.asarray(sample_tokens(rows, jax.random.key(0), np.float32(1.0),
                                     Sampler(False, top_k, top_p)))
    assert set(draws.tolist()) == allowed
    kept = probs[sorted(allowed)] / probs[sorted(allowed)].sum()
    frequencies = np.bincount(draws, minlength=len(probs))[sorted(allowed)] / len(draws)
    np.testing.assert_allclose(frequencies, kept, atol=0.03)


def test_seed_reproduces_samples_and_different_seeds_differ(gqa):
    _, config, params = gqa
    prompts = _prompts(config.vocab_size)
    sample = functools.partial(generate, config, params, prompts, NEW, temperature=1.0, top_k=50)
    first, again, other = sample(seed=0), sample(seed=0), sample(seed=1)
    assert first == again and first != other
    # temperature is not part of the compile key; top_k=1 at any temperature is greedy.
    assert generate(config, params, prompts, NEW, temperature=0.7, top_k=1) == \
        generate(config, params, prompts, NEW)


def test_stream_yields_the_greedy_tokens_and_stops_at_eos(gqa):
    _, config, params = gqa
    prompt = _prompts(config.vocab_size)[1]
    expected = generate(config, params, _prompts(config.vocab_size), NEW)[1]
    assert list(generate_stream(config, params, prompt, NEW)) == expected
    assert list(generate_stream(config, params, prompt, NEW, eos_id=expected[2])) == \
        expected[:expected.index(expected[2]) + 1]


CUSTOM_RULES = (("batch", "data"), ("length", None), ("act_embed", None), ("act_heads", "tensor"),
                ("act_kv_heads", "tensor"), ("act_mlp", "tensor"), ("act_vocab", "tensor"),
                ("embed", None), ("vocab", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
                ("mlp", "tensor"), ("head_dim", None), ("norm", None), ("layers", None))


@pytest.mark.parametrize("mesh_shape, axis_names, rules", [
    ((2, 2), ("data", "tensor"), CUSTOM_RULES),
    ((2, 2, 2), ("data", "fsdp", "tensor"), None),  # llamax.sharding's default rules (FSDP + TP)
])
def test_sharded_greedy_equals_unsharded(gqa, mesh_shape, axis_names, rules):
    _, config, params = gqa
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    mesh = jax.make_mesh(mesh_shape, axis_names, axis_types=(jax.sharding.AxisType.Auto,) * len(mesh_shape),
                         devices=devices)
    prompts = _prompts(config.vocab_size)  # 3 rows: padded to a batch the data axes divide
    assert generate(config, params, prompts, NEW, mesh=mesh, rules=rules) == \
        generate(config, params, prompts, NEW)


@pytest.mark.parametrize("change, error, match", [
    (dict(prompts=[]), DataError, "non-empty list"),
    (dict(prompts=[[1, 5], []]), DataError, "prompt 1 must be a non-empty"),
    (dict(prompts=[[1, 300]]), DataError, "outside the model vocabulary"),
    (dict(prompts=[[1, -4]]), DataError, "outside the model vocabulary"),
    (dict(prompts=[[1] * 250]), DataError, "max_position_embeddings=256"),
    (dict(max_new_tokens=0), ConfigError, "max_new_tokens must be a positive"),
    (dict(temperature=-0.5), ConfigError, "temperature must be >= 0"),
    (dict(top_p=0.0), ConfigError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), ConfigError, r"top_p must be in \(0, 1\]"),
    (dict(top_k=0), ConfigError, "top_k must be in"),
    (dict(top_k=129), ConfigError, "top_k must be in"),
    (dict(eos_id=128), ConfigError, "eos_id=128 is outside"),
    (dict(stop_ids=[2, 128]), ConfigError, "stop id 128 of stop_ids is not a token id"),
    (dict(stop_ids=2), ConfigError, "stop_ids must be a sequence"),
    (dict(stop_ids=[2.0]), ConfigError, "stop id 2.0"),
])
def test_bad_input_raises_clear_errors(gqa, change, error, match):
    _, config, params = gqa
    kwargs = dict(prompts=[[1, 5, 6]], max_new_tokens=8, temperature=1.0)
    kwargs.update(change)
    with pytest.raises(error, match=match):
        generate(config, params, kwargs.pop("prompts"), kwargs.pop("max_new_tokens"), **kwargs)
    assert issubclass(error, ValueError)


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    """An HF folder (vocab 320, context 256) with its SentencePiece tokenizer.model (300 pieces) inside."""
    from llamax.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("cli")
    text = root / "text.txt"
    text.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    tokenizer = train_tokenizer([text], root / "tok" / "tokenizer.model", vocab_size=300)
    model = make_hf_model("llama3_gqa", vocab_size=320)  # padded past the tokenizer's 300 pieces
    config, params = _from_hf(model)
    save_hf(config, params, root / "hf", tokenizer=tokenizer.path)
    return root, tokenizer, config, params


def test_cli_streams_one_prompt_and_batches_several(cli_checkpoint, tmp_path, capsys):
    from experiments import sample as cli
    from llamax.convert.orbax import save_params

    _, tokenizer, config, params = cli_checkpoint
    argv = ["--checkpoint", str(cli_checkpoint[0] / "hf"), "--tokenizer", str(tokenizer.path),
            "--max_new_tokens", "6", "--prompt", "the quick"]
    assert cli.main(argv) == 0
    prompt = tokenizer.encode("the quick")
    (expected,) = generate(config, params, [prompt], 6, eos_id=tokenizer.eos_id)
    text = tokenizer.decode([t for t in prompt + expected if t < tokenizer.vocab_size])
    assert capsys.readouterr().out == text + "\n"
    save_params(tmp_path / "orbax", config, params)  # a llamax params checkpoint reads the same
    assert cli.main(["--checkpoint", str(tmp_path / "orbax")] + argv[2:]) == 0
    assert capsys.readouterr().out == text + "\n"
    assert cli.main(argv + ["--prompt", "lazy dog"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[0] " + text and lines[1].startswith("[1] lazy dog")
    assert cli.main(argv[:1] + [str(tmp_path / "missing")] + argv[2:]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(LlamaxError, match="top_k must be in"):
        generate(config, params, [prompt], 4, temperature=1.0, top_k=10_000)


def _decode(tokenizer, ids):
    return tokenizer.decode([t for t in ids if t < tokenizer.vocab_size])  # the model pads its vocab


def test_cli_uses_the_checkpoints_own_tokenizer_for_hf_meta_and_chat(cli_checkpoint, tmp_path, capsys):
    """No --tokenizer: the folder's tokenizer.model (copied along by convert into a Meta folder)."""
    from experiments import sample as cli
    from llamax.convert.hub import convert

    root, tokenizer, config, params = cli_checkpoint
    (expected,) = generate(config, params, [tokenizer.encode("the quick")], 6, stop_ids=tokenizer.stop_ids)
    text = _decode(tokenizer, tokenizer.encode("the quick") + expected) + "\n"
    convert(root / "hf", "hf", tmp_path / "meta", "meta", progress=False)
    for checkpoint in (root / "hf", tmp_path / "meta"):
        assert cli.main(["--checkpoint", str(checkpoint), "--max_new_tokens", "6", "--prompt", "the quick"]) == 0
        assert capsys.readouterr().out == text
    # --chat: the tokenizer's chat template (here the built-in Llama-2 one), the reply alone.
    chat = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "the lazy dog"}], True)
    prompt = tokenizer.encode(chat, bos=False, allow_special=True)
    (reply,) = generate(config, params, [prompt], 6, stop_ids=tokenizer.stop_ids)
    assert cli.main(["--checkpoint", str(root / "hf"), "--chat", "--system", "Be brief.",
                     "--max_new_tokens", "6", "--prompt", "the lazy dog"]) == 0
    assert capsys.readouterr().out == _decode(tokenizer, reply) + "\n"


@pytest.mark.parametrize("extra, message", [
    (["--max_new_tokens", "-5"], "max_new_tokens must be a positive integer, got -5"),
    (["--prompt", "the quick brown fox " * 200], "> max_position_embeddings=256"),
    (["--top_p", "1.5"], "top_p must be in (0, 1]"),
    (["--system", "Be brief."], "--system applies to --chat prompts"),
    (["--tokenizer", "/no/such/tokenizer.model"], "'/no/such/tokenizer.model' does not exist"),
    (["--checkpoint", "/no/such/model"], "checkpoint '/no/such/model' does not exist"),
])
def test_cli_checks_every_argument_before_reading_weights_or_printing(cli_checkpoint, capsys, monkeypatch,
                                                                      extra, message):
    from experiments import sample as cli

    def never(*args, **kwargs):
        raise AssertionError("the weights were read before the arguments were checked")

    monkeypatch.setattr(cli, "load_model", never)
    argv = ["--checkpoint", str(cli_checkpoint[0] / "hf"), "--prompt", "the quick", *extra]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing echoed
    assert message in captured.err and captured.err.count("\n") == 1
