"""Fuzzed inputs: every file or flag a user hands llamax either works or fails with one clear error.

Each target starts from a valid input and mutates it with hypothesis (values replaced by random
JSON of the wrong type or range, keys dropped, whole documents replaced by garbage), derandomized
so CI sees the same cases every run. The contract checked for every case:
  * the result is valid (a config that passes `validate`, documents, a tokenizer), or
  * the error is a `llamax.errors.LlamaxError` (a ValueError) with a message; never a raw
    KeyError/IndexError/TypeError/AttributeError, and
  * writers leave no destination (and no staging folder) behind when they fail.
`REJECTED` counts the malformed cases each target refused; each must refuse >= 20.
"""
import collections
import contextlib
import io
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from llamax.convert import weight_files as weights_io
from llamax.config import ModelConfig
from llamax.convert import expected_hf_shapes, hf_to_params, load_hf, save_hf
from llamax.convert.hub import convert
from llamax.convert.meta import save_meta
from llamax.data.documents import read_documents
from llamax.errors import LlamaxError
from llamax.convert.meta_config import config_from_meta, read_params_json
from llamax.tokenizer import Tokenizer, train_tokenizer

FUZZ = settings(max_examples=60, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
REJECTED: collections.Counter = collections.Counter()
ACCEPTED: collections.Counter = collections.Counter()

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
WRONG = st.one_of(JSON, st.sampled_from([0, -1, -64, 1.5, "64", "", None, True, [], {}, 2**64,
                                         float("nan"), float("inf")]))


@st.composite
def mutated(draw, base: dict) -> object:
    """`base` with 1-3 keys replaced by wrong values or dropped, a random key added, or garbage."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    record = json.loads(json.dumps(base))
    for key in draw(st.lists(st.sampled_from(sorted(base)), min_size=1, max_size=3, unique=True)):
        if draw(st.integers(0, 3)) == 0:
            del record[key]
        else:
            record[key] = draw(WRONG)
    if draw(st.booleans()):
        record[draw(st.text(max_size=6))] = draw(JSON)
    return record


def outcome(target: str, call):
    """Runs `call`; counts a LlamaxError as a rejected case and re-raises anything else."""
    try:
        result = call()
    except LlamaxError as error:
        assert str(error), f"{target}: {type(error).__name__} without a message"
        REJECTED[target] += 1
        return None
    ACCEPTED[target] += 1
    return result


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print("\nfuzz cases (rejected / accepted):",
          {k: (REJECTED[k], ACCEPTED[k]) for k in sorted(set(REJECTED) | set(ACCEPTED))})
    for target in REJECTED | ACCEPTED:
        assert REJECTED[target] >= 20, f"{target}: only {REJECTED[target]} malformed cases rejected"


# ---- config.json -------------------------------------------------------------------------------

VALID_HF = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=48, num_layers=1, num_heads=2,
                       num_kv_heads=1, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64}).to_hf()


@FUZZ
@given(mutated(VALID_HF))
def test_config_json(hf):
    config = outcome("config.json", lambda: ModelConfig.from_hf(hf))
    if config is not None:
        config.validate()
        assert ModelConfig.from_hf(config.to_hf()) == config


# ---- params.json -------------------------------------------------------------------------------

VALID_META = {"dim": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 32,
              "multiple_of": 16, "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 5e5,
              "use_scaled_rope": True, "max_seq_len": 128}


@FUZZ
@given(st.one_of(mutated(VALID_META).map(lambda p: json.dumps(p).encode()),
                 st.binary(max_size=40), st.just(b"[" * 100_000)))
def test_params_json(data):
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "params.json").write_bytes(data)

        def parse():
            params = read_params_json(Path(folder))
            return config_from_meta(params, vocab_size=32, intermediate_size=48, tie_word_embeddings=False)

        config = outcome("params.json", parse)
        if config is not None:
            config.validate()


# ---- index.json and safetensors headers ----------------------------------------------------------

CONFIG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=48, num_layers=1, num_heads=2,
                     num_kv_heads=1)
TENSORS = {name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)
           for name, shape in expected_hf_shapes(CONFIG).items()}
SHARDS = {name: f"model-0000{i % 2 + 1}-of-00002.safetensors" for i, name in enumerate(TENSORS)}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sharded")
    for shard in set(SHARDS.values()):
        weights_io.save_safetensors(folder / shard, {n: t for n, t in TENSORS.items() if SHARDS[n] == shard})
    (folder / "config.json").write_text(json.dumps(CONFIG.to_hf()))
    return folder


@st.composite
def mutated_index(draw) -> object:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(JSON)
    if kind == 1:
        return {"weight_map": draw(WRONG)}
    weight_map = dict(SHARDS)
    names = draw(st.lists(st.sampled_from(sorted(SHARDS)), min_size=1, max_size=3, unique=True))
    for name in names:
        choice = draw(st.integers(0, 3))
        if choice == 0:
            del weight_map[name]
        elif choice == 1:
            weight_map[name] = draw(st.sampled_from(["/etc/passwd", "../x.safetensors", ".", "",
                                                     "config.json", "model-00003-of-00002.safetensors"]))
        else:
            weight_map[name] = draw(WRONG)
    if draw(st.booleans()):
        weight_map[draw(st.text(max_size=8))] = draw(st.sampled_from(sorted(set(SHARDS.values()))))
    return {"metadata": {}, "weight_map": weight_map}


@FUZZ
@given(mutated_index())
def test_index_json(sharded, index):
    index_path = sharded / "model.safetensors.index.json"
    index_path.write_text(json.dumps(index))
    result = outcome("index.json", lambda: load_hf(sharded))
    if result is not None:  # the mutation was harmless (an extra entry for an ignored name, say)
        np.testing.assert_array_equal(result[1]["norm"]["weight"], TENSORS["model.norm.weight"])


@FUZZ
@given(st.one_of(JSON, st.dictionaries(st.text(max_size=4), st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "F16", "Q4", 3]), "shape": WRONG, "data_offsets": WRONG}), max_size=2)),
    st.integers(-2, 64))
def test_safetensors_header(header, length_skew):
    with tempfile.TemporaryDirectory() as folder:
        blob = json.dumps(header).encode()
        path = Path(folder) / "model.safetensors"
        path.write_bytes(struct.pack("<Q", max(0, len(blob) + length_skew)) + blob + b"\0" * 16)

        def read_all():
            weights = weights_io.WeightFolder(Path(folder))
            return {name: np.asarray(weights[name]) for name in weights}

        outcome("safetensors header", read_all)


# ---- JSONL documents (pretraining text and SFT) -----------------------------------------------------

VALID_SFT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]}
VALID_PROMPT = {"prompt": "2+2?", "response": "4", "system": "math"}
LINE = st.one_of(mutated(VALID_SFT).map(json.dumps), mutated(VALID_PROMPT).map(json.dumps),
                 st.builds(lambda m: json.dumps({"messages": [m]}), mutated({"role": "user", "content": "x"})),
                 st.text(max_size=20), st.sampled_from(["[" * 5000, '{"text": "\\ud800"}', "NaN",
                                                        '{"text": 1e999}', "\x00", "\ufeff{}"]))


@FUZZ
@given(st.lists(LINE, min_size=1, max_size=4), st.binary(max_size=6), st.booleans())
def test_jsonl_records(lines, raw_tail, sft_format):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + raw_tail)
        documents = outcome("JSONL records", lambda: read_documents([path], sft_format=sft_format))
        if documents is not None:
            assert documents and all(isinstance(d, dict if sft_format else str) for d in documents)


# ---- tokenizer -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    corpus = tmp_path_factory.mktemp("tok") / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\nÆsir 東京 😀 12345\n" * 50)
    return train_tokenizer([corpus], corpus.parent / "tokenizer.model", vocab_size=300)


# Any str, including lone surrogates (what `bytes.decode(errors="surrogateescape")` produces).
ANY_TEXT = st.lists(st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)),
                    max_size=30).map("".join)
IDS = st.lists(st.one_of(st.integers(-3, 310), st.floats(), st.none(), st.text(max_size=2)), max_size=6)


@FUZZ
@given(ANY_TEXT, IDS)
def test_tokenizer_encode_decode(tokenizer, text, ids):
    encoded = outcome("tokenizer encode", lambda: tokenizer.encode(text, bos=False))
    if encoded is not None:
        assert all(0 <= i < tokenizer.vocab_size for i in encoded)
        # Byte fallback: every valid string round-trips.
        assert tokenizer.decode(encoded) == text
    outcome("tokenizer decode", lambda: tokenizer.decode(ids))


@settings(FUZZ, max_examples=24)
@given(st.one_of(st.binary(max_size=300), ANY_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
                 st.sampled_from([b"\n" * 50, b"\x00" * 100, b"a" * 40_000, b"\xff\xfe" * 30])),
       st.sampled_from([0, 100, 259, 260, 261, 300]))
def test_train_tokenizer_on_weird_files(content, vocab_size):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "input.txt"
        path.write_bytes(content)
        trained = outcome("train_tokenizer", lambda: train_tokenizer(
            [path], Path(folder) / "out" / "t.model", vocab_size=vocab_size, num_threads=1))
        if trained is not None:
            assert trained.vocab_size == vocab_size
        else:
            assert not (Path(folder) / "out" / "t.model").exists()


# ---- writers leave nothing behind ---------------------------------------------------------------

def damage(params: dict, draw) -> dict:
    """`params` with one leaf dropped, reshaped or replaced by a wrong value, or a key added."""
    params = copy_tree(params)
    path = draw(st.sampled_from([("embed_tokens", "embedding"), ("norm", "weight"), ("lm_head", "kernel"),
                                 ("layers", "self_attn", "q_proj", "kernel"), ("layers", "mlp", "up_proj", "kernel")]))
    parent = params
    for key in path[:-1]:
        parent = parent[key]
    how = draw(st.integers(0, 3))
    if how == 0:
        del parent[path[-1]]
    elif how == 1:
        parent[path[-1]] = np.zeros(draw(st.lists(st.integers(0, 5), max_size=3)), np.float32)
    elif how == 2:
        parent[path[-1]] = draw(WRONG)
    else:
        params[draw(st.text(min_size=1, max_size=5))] = {"kernel": np.ones(3, np.float32)}
    return params


def copy_tree(tree):
    return {k: copy_tree(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


@pytest.mark.parametrize("writer", ["hf", "meta", "convert"])
@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_writers_leave_no_partial_output(tmp_path_factory, data, writer):
    root = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    destination = root / "out"
    params = hf_to_params(CONFIG, TENSORS)
    if writer == "convert":  # a source whose config.json is fuzzed
        source = save_hf(CONFIG, params, root / "src")
        (source / "config.json").write_text(json.dumps(data.draw(mutated(CONFIG.to_hf()))))
        call = lambda: convert(source, "hf", destination, "meta", progress=False)  # noqa: E731
    else:
        bad = damage(params, data.draw)
        save = save_hf if writer == "hf" else save_meta
        call = lambda: save(CONFIG, bad, destination)  # noqa: E731
    if outcome(f"writer {writer}", call) is None:
        assert sorted(p.name for p in root.iterdir()) == (["src"] if writer == "convert" else [])


# ---- gin bindings on the training entry point ---------------------------------------------------

GIN_KEYS = ["TRAIN_STEPS", "BATCH_SIZE", "SEQ_LEN", "LEARNING_RATE", "VOCAB_SIZE", "CHECKPOINT_EVERY",
            "MODEL_DIR", "TRAIN_DATA", "fit.TrainConfig.train_steps", "fit.TrainConfig.log_every",
            "config.ModelConfig.hidden_size", "config.ModelConfig.num_heads", "config.ModelConfig.rms_norm_eps",
            "config.ModelConfig.dtype", "config.ModelConfig.rope_scaling", "fit.DataConfig.text_split",
            "fit.TrainConfig.on_nonfinite", "fit.TrainConfig.bogus", "fit.TrainConfg.seed", "NOT_A_MACRO",
            "train.run.model_config", "sharding.MeshConfig.fsdp"]
# Values whose type or range is wrong for (nearly) every key above; none is valid gin for ints.
GIN_VALUES = ["-5", "0", "'abc'", "''", "None", "[1, 2]", "{'a': 1}", "-1e9", "1e400", "@nothing()",
              "%UNDEFINED", "'unterminated", "(1,", "))", "@config.ModelConfig()", "@fit.TrainConfig",
              "True", "1 2", "'float32' 'x'", "\"multi\nline\""]


@pytest.fixture(scope="module")
def gin_setup(tmp_path_factory, tokenizer):
    return {"root": tmp_path_factory.mktemp("gin"), "tokenizer": str(tokenizer.path)}


def run_main(argv: list[str]) -> tuple[int, str]:
    import gin

    from experiments import train as train_cli

    gin.clear_config()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = train_cli.main(argv)
        except SystemExit as exit_:  # argument errors exit with a message, like argparse
            code = 2 if isinstance(exit_.code, str) else exit_.code
            stderr.write(str(exit_.code))
    return code, stderr.getvalue()


def test_gin_bindings_fail_cleanly(gin_setup, monkeypatch):
    """80 bad `--gin.X=V` bindings (a seeded sample of keys x values, plus random text) exit 1 or 2
    with one `error:` line; nothing trains (fit is stubbed, so a binding that happens to be valid
    just counts as accepted)."""
    import random

    from experiments import train as train_cli
    from llamax.train.fit import FitResult

    monkeypatch.setattr(train_cli, "fit", lambda *a, **k: FitResult("completed", 0, None, None))
    # A fuzzed MODEL_DIR (e.g. 'float32' 'x', which gin concatenates) is a relative path.
    monkeypatch.chdir(gin_setup["root"])
    rng = random.Random(0)
    garbage = ["".join(rng.choice("()[]{}'\"@%=,.:; \nab1-_") for _ in range(rng.randint(1, 8)))
               for _ in range(20)]
    cases = rng.sample([(k, v) for k in GIN_KEYS for v in GIN_VALUES], 60)
    cases += [(rng.choice(GIN_KEYS), text) for text in garbage]
    escapes: dict[str, list[str]] = collections.defaultdict(list)
    for key, value in cases:
        argv = ["--gin_file=configs/runs/tiny.gin", f"--gin.MODEL_DIR='{gin_setup['root'] / 'run'}'",
                f"--gin.TOKENIZER='{gin_setup['tokenizer']}'", f"--gin.{key}={value}"]
        try:
            code, stderr = run_main(argv)
        except Exception as error:  # noqa: BLE001 -- classified below
            escapes[type(error).__name__].append(f"--gin.{key}={value!r}")
            continue
        if code == 0:
            ACCEPTED["gin bindings"] += 1
            continue
        assert code in (1, 2), (key, value, code, stderr)
        assert stderr.startswith("error:") or "not found" in stderr, (key, value, stderr)
        assert "Traceback" not in stderr, (key, value, stderr)
        REJECTED["gin bindings"] += 1
    assert not escapes, f"raw exceptions escaped experiments.train.main: {dict(escapes)}"
